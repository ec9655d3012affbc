"""Artifact store and Parquet lineage footer on a local folder."""

import dagster as dg
import polars as pl
import pytest

from kad_pipeline.parquet import read_lineage, read_parquet, write_parquet
from kad_pipeline.storage import ArtifactCorruptError, ArtifactNotFoundError, ArtifactStore
from resources.io_manager import ParquetIOManager


def test_put_bytes_replaces_atomically(tmp_path):
    store = ArtifactStore(str(tmp_path))
    uri = store.put_bytes("a/b.txt", b"old")
    store.put_bytes("a/b.txt", b"new")
    assert uri == str(tmp_path / "a" / "b.txt")
    assert store.get_bytes("a/b.txt") == b"new"
    assert list(store.list_keys("a")) == ["a/b.txt"]


def test_missing_artifact_error_names_uri(tmp_path):
    store = ArtifactStore(str(tmp_path))
    with pytest.raises(ArtifactNotFoundError, match="missing.bin"):
        store.get_bytes("missing.bin")


@pytest.mark.parametrize("key", ["", "../escape", "a/./b", "a//b"])
def test_invalid_keys_rejected(tmp_path, key):
    with pytest.raises(ValueError, match="invalid artifact key"):
        ArtifactStore(str(tmp_path)).put_bytes(key, b"x")


def test_dir_round_trip_and_incomplete_upload(tmp_path):
    source = tmp_path / "checkpoint"
    (source / "sub").mkdir(parents=True)
    (source / "model.safetensors").write_bytes(b"\x00\x01")
    (source / "sub" / "config.json").write_text("{}")
    store = ArtifactStore(str(tmp_path / "store"))
    store.put_dir(source, "checkpoints/run1")
    copy = store.get_dir("checkpoints/run1", tmp_path / "copy")
    assert (copy / "model.safetensors").read_bytes() == b"\x00\x01"
    assert (copy / "sub" / "config.json").read_text() == "{}"

    # A re-upload to the same key that crashed after one file leaves a mismatching file.
    (tmp_path / "store" / "checkpoints" / "run1" / "model.safetensors").write_bytes(b"\x00\x02")
    with pytest.raises(ArtifactCorruptError, match="does not match its folder manifest"):
        store.get_dir("checkpoints/run1")

    # Files without the manifest written last are an unfinished upload.
    store.put_bytes("checkpoints/run2/model.safetensors", b"partial")
    with pytest.raises(ArtifactNotFoundError, match="did not finish"):
        store.get_dir("checkpoints/run2")


def test_parquet_footer_carries_lineage(tmp_path):
    store = ArtifactStore(str(tmp_path))
    df = pl.DataFrame({"report_id": ["CXR1", "CXR2"], "value": [1, None]}, schema={"report_id": pl.String, "value": pl.Int8})
    write_parquet(store, "t.parquet", df, {"asset_key": "reports", "run_id": "r1"})
    lineage = read_lineage(store, "t.parquet")
    assert lineage["asset_key"] == "reports"
    assert lineage["row_count"] == 2
    assert lineage["schema"] == {"report_id": "String", "value": "Int8"}
    assert read_parquet(store, "t.parquet").equals(df)


def test_io_manager_round_trip_with_lineage(tmp_path):
    """A real materialization writes a table whose footer names its asset, run and upstream."""

    @dg.asset(code_version="up-v1")
    def upstream() -> pl.DataFrame:
        return pl.DataFrame({"report_id": ["a", "b", "c"], "n": [1, 2, 3]})

    @dg.asset(code_version="down-v7")
    def downstream(upstream: pl.DataFrame) -> pl.DataFrame:
        return upstream.filter(pl.col("n") > 1)

    io_manager = ParquetIOManager(base_uri=str(tmp_path))
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([upstream, downstream], resources={"io_manager": io_manager}, instance=instance)
    assert result.success

    store = ArtifactStore(str(tmp_path))
    table = read_parquet(store, "tables/downstream.parquet")
    assert table["report_id"].to_list() == ["b", "c"]
    lineage = read_lineage(store, "tables/downstream.parquet")
    assert lineage["asset_key"] == "downstream"
    assert lineage["code_version"] == "down-v7"
    assert lineage["run_id"] == result.run_id
    assert lineage["row_count"] == 2
    assert lineage["partition"] is None
    upstream_version = instance.get_latest_materialization_event(dg.AssetKey("upstream")).asset_materialization.tags[
        "dagster/data_version"
    ]
    assert lineage["upstream_data_versions"] == {"upstream": upstream_version}

    materialization = result.asset_materializations_for_node("downstream")[0]
    assert materialization.metadata["dagster/row_count"].value == 2
    assert materialization.metadata["code_version"].value == "down-v7"
    columns = [column.name for column in materialization.metadata["dagster/column_schema"].value.columns]
    assert columns == ["report_id", "n"]
