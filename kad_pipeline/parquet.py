"""Parquet files that carry their own lineage in the file footer.

A table found alone in a bucket still records which asset, partition, code version and run
wrote it, and from which upstream data versions.
"""

from __future__ import annotations

import io
import json
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from kad_pipeline.storage import ArtifactStore

# The footer key under which the lineage JSON document is stored.
LINEAGE_KEY = b"kad_pipeline.lineage"


def table_schema(df: pl.DataFrame) -> dict[str, str]:
    """Return the column names and polars types of a frame, in column order."""
    return {name: str(dtype) for name, dtype in df.schema.items()}


def to_parquet_bytes(df: pl.DataFrame, lineage: dict[str, Any] | None = None) -> bytes:
    """Serialize a frame to Parquet bytes with ``lineage`` as JSON in the footer."""
    table = df.to_arrow()
    if lineage is not None:
        document = dict(lineage)
        document.setdefault("row_count", df.height)
        document.setdefault("schema", table_schema(df))
        metadata = dict(table.schema.metadata or {})
        metadata[LINEAGE_KEY] = json.dumps(document, sort_keys=True, default=str).encode("utf-8")
        table = table.replace_schema_metadata(metadata)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def write_parquet(store: ArtifactStore, key: str, df: pl.DataFrame, lineage: dict[str, Any] | None = None) -> str:
    """Write a frame atomically under ``key`` and return its URI."""
    return store.put_bytes(key, to_parquet_bytes(df, lineage))


def read_parquet(store: ArtifactStore, uri_or_key: str) -> pl.DataFrame:
    """Read a Parquet artifact into a polars frame."""
    table = pq.read_table(pa.BufferReader(store.get_bytes(uri_or_key)))
    return pl.from_arrow(table)


def read_lineage(store: ArtifactStore, uri_or_key: str) -> dict[str, Any]:
    """Return the lineage document from a Parquet artifact's footer, or {} if it has none."""
    schema = pq.read_schema(pa.BufferReader(store.get_bytes(uri_or_key)))
    raw = (schema.metadata or {}).get(LINEAGE_KEY)
    return json.loads(raw) if raw else {}


def read_lineage_from_path(path: str) -> dict[str, Any]:
    """Return the lineage document of a local Parquet file, or {} if it has none."""
    raw = (pq.read_schema(path).metadata or {}).get(LINEAGE_KEY)
    return json.loads(raw) if raw else {}
