"""Partitioning of per-report tables into stable hash buckets of the report id."""

import os

import dagster as dg
import polars as pl

from kad_pipeline.partitions import DEFAULT_BUCKETS, bucket_key, bucket_keys, bucket_of


def configured_bucket_count() -> int:
    """Return the number of report buckets: ``$KAD_REPORT_BUCKETS`` or the default of 32."""
    raw = os.environ.get("KAD_REPORT_BUCKETS", str(DEFAULT_BUCKETS))
    try:
        count = int(raw)
    except ValueError:
        raise ValueError(f"KAD_REPORT_BUCKETS must be an integer, got {raw!r}") from None
    if not 1 <= count <= 999:
        raise ValueError(f"KAD_REPORT_BUCKETS must be between 1 and 999, got {count}")
    return count


N_BUCKETS = configured_bucket_count()

# Tens to a few hundred buckets: a change to some reports re-runs only their buckets, and
# the partition count stays small enough for the UI and the scheduler.
report_buckets = dg.StaticPartitionsDefinition(bucket_keys(N_BUCKETS))

# Per-report assets may run any range of buckets in one run, which the demo and
# `dagster asset materialize --partition-range b000...b031` use.
single_run = dg.BackfillPolicy.single_run()


def split_by_bucket(df: pl.DataFrame, partition_keys: list[str], id_column: str = "report_id") -> dict[str, pl.DataFrame]:
    """Split rows by the bucket of ``id_column`` into one frame per requested partition key.

    Every requested key gets a frame, empty when no row falls in it, so that a bucket whose
    reports were all deleted is overwritten rather than left with stale rows. Rows outside
    the requested buckets raise, since they would otherwise be lost.
    """
    if df.height == 0:
        return {key: df for key in partition_keys}
    keys = pl.Series([bucket_key(bucket_of(value, N_BUCKETS)) for value in df[id_column].to_list()])
    outside = set(keys.unique().to_list()) - set(partition_keys)
    if outside:
        raise ValueError(f"rows belong to buckets {sorted(outside)} outside the requested partitions {partition_keys}")
    return {key: df.filter(keys == key) for key in partition_keys}


def partition_output(context: dg.AssetExecutionContext, frames: dict[str, pl.DataFrame]):
    """Return the IO manager's expected value: a dict for a range of buckets, else one frame."""
    keys = context.partition_keys
    return frames if len(keys) > 1 else frames[keys[0]]
