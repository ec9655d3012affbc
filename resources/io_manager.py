"""The Parquet IO manager: every table asset is a Parquet file that carries its lineage."""

from __future__ import annotations

from typing import Any

import dagster as dg
import polars as pl
from pydantic import Field

from kad_pipeline.parquet import read_parquet, table_schema, write_parquet
from kad_pipeline.storage import ArtifactNotFoundError, ArtifactStore
from resources.storage import default_artifacts_uri


class ParquetIOManager(dg.ConfigurableIOManager):
    """Store polars DataFrames as Parquet under ``<base_uri>/tables/<asset key>[/<partition>].parquet``.

    The footer of each file and the Dagster materialization both carry the asset key,
    partition, code version, run id, upstream data versions, row count and schema.
    A partitioned asset materialized for a range of partitions in one run returns a dict
    of partition key to frame. A downstream asset that reads a partitioned table without a
    partition mapping receives all its partitions concatenated.
    """

    base_uri: str = Field(default_factory=default_artifacts_uri, description="Local folder or s3://bucket/prefix.")
    s3_endpoint_url: str | None = Field(default=None, description="Endpoint of an S3-compatible store.")

    def _store(self) -> ArtifactStore:
        return ArtifactStore(self.base_uri, s3_endpoint_url=self.s3_endpoint_url)

    @staticmethod
    def table_key(asset_key: dg.AssetKey, partition: str | None = None) -> str:
        """Return the storage key of an asset's table, or of one of its partitions."""
        base = "tables/" + "/".join(asset_key.path)
        return f"{base}/{partition}.parquet" if partition is not None else f"{base}.parquet"

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        store = self._store()
        if context.has_asset_partitions:
            keys = context.asset_partition_keys
            if isinstance(obj, dict):
                frames = obj
            elif len(keys) == 1:
                frames = {keys[0]: obj}
            else:
                raise TypeError(
                    f"asset {context.asset_key.to_user_string()} ran for {len(keys)} partitions and must "
                    "return a dict of partition key to DataFrame"
                )
            missing = set(keys) - set(frames)
            if missing:
                raise ValueError(f"asset {context.asset_key.to_user_string()} returned no table for partitions {sorted(missing)}")
        else:
            frames = {None: obj}

        lineage_base = self._lineage(context)
        uris = {}
        rows = 0
        schema: dict[str, str] = {}
        for partition, frame in frames.items():
            if not isinstance(frame, pl.DataFrame):
                raise TypeError(
                    f"ParquetIOManager stores polars DataFrames; asset {context.asset_key.to_user_string()} "
                    f"returned {type(frame).__name__}"
                )
            lineage = dict(lineage_base, partition=partition)
            uris[partition] = write_parquet(store, self.table_key(context.asset_key, partition), frame, lineage)
            rows += frame.height
            schema = table_schema(frame)

        columns = [dg.TableColumn(name=name, type=dtype) for name, dtype in schema.items()]
        metadata: dict[str, Any] = {
            "uri": dg.MetadataValue.path(next(iter(uris.values()))) if len(uris) == 1 else dg.MetadataValue.json(
                {str(k): v for k, v in uris.items()}
            ),
            "dagster/row_count": rows,
            "dagster/column_schema": dg.TableSchema(columns=columns),
            "code_version": lineage_base["code_version"] or "",
            "upstream_data_versions": dg.MetadataValue.json(lineage_base["upstream_data_versions"]),
        }
        context.add_output_metadata(metadata)
        context.log.info(
            "Wrote %d rows of %s to %d Parquet file(s) under %s",
            rows, context.asset_key.to_user_string(), len(uris), store.base_uri,
        )

    def load_input(self, context: dg.InputContext) -> pl.DataFrame:
        store = self._store()
        asset_key = context.asset_key
        if context.has_asset_partitions:
            frames = []
            for partition in context.asset_partition_keys:
                key = self.table_key(asset_key, partition)
                try:
                    frames.append(read_parquet(store, key))
                except ArtifactNotFoundError:
                    raise ArtifactNotFoundError(
                        f"partition {partition} of {asset_key.to_user_string()} has no table at "
                        f"{store.uri(key)}; materialize that partition first"
                    ) from None
            if not frames:
                raise ValueError(f"no partitions of {asset_key.to_user_string()} were requested")
            return pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]
        key = self.table_key(asset_key)
        try:
            return read_parquet(store, key)
        except ArtifactNotFoundError:
            raise ArtifactNotFoundError(
                f"{asset_key.to_user_string()} has no table at {store.uri(key)}; materialize it first"
            ) from None

    def _lineage(self, context: dg.OutputContext) -> dict[str, Any]:
        """Collect asset key, code version, run id and upstream data versions for the footer."""
        code_version = None
        upstream: dict[str, str | None] = {}
        try:
            step_context = context.step_context
            node = step_context.job_def.asset_layer.asset_graph.get(context.asset_key)
            code_version = node.code_version
            for parent in sorted(node.parent_keys, key=lambda k: k.to_user_string()):
                info = step_context.maybe_fetch_and_get_input_asset_version_info(parent)
                version = info.data_version.value if info is not None and info.data_version else None
                upstream[parent.to_user_string()] = version
        except dg.DagsterInvariantViolationError:
            # Outside a run (a direct IO manager call in a test) there is no step context.
            pass
        return {
            "asset_key": context.asset_key.to_user_string(),
            "code_version": code_version,
            "run_id": _run_id(context),
            "upstream_data_versions": upstream,
        }


def _run_id(context: dg.OutputContext) -> str | None:
    try:
        return context.run_id
    except dg.DagsterInvariantViolationError:
        return None

