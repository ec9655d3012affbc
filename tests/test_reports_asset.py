"""The reports asset: bad files become invalid_reports rows and the rest of the bucket goes on."""

import tarfile

import dagster as dg
import polars as pl

from assets import reports as reports_module
from assets.partitions import report_buckets
from kad_pipeline.definitions import PARTITION_RANGE_END, PARTITION_RANGE_START
from kad_pipeline.partitions import bucket_key, bucket_of
from kad_pipeline.reports import openi_tarball_path
from resources.io_manager import ParquetIOManager
from resources.reports import ReportSourceResource


def _copy_openi(folder, names):
    with tarfile.open(openi_tarball_path()) as archive:
        for member in archive.getmembers():
            if member.name.rsplit("/", 1)[-1] in names:
                (folder / member.name.rsplit("/", 1)[-1]).write_bytes(archive.extractfile(member).read())


def test_bad_reports_do_not_stop_their_bucket(tmp_path):
    source = tmp_path / "xml"
    source.mkdir()
    _copy_openi(source, {"1.xml", "2.xml", "3.xml", "4.xml"})
    (source / "empty.xml").write_bytes(b"")
    (source / "garbage.xml").write_bytes(b"\xff\xfe\x00\x81 not xml at all \x00")
    (source / "truncated.xml").write_bytes((source / "1.xml").read_bytes()[:300])

    keys = report_buckets.get_partition_keys()
    defs = dg.Definitions(
        assets=[reports_module.reports],
        resources={
            "io_manager": ParquetIOManager(base_uri=str(tmp_path / "artifacts")),
            "report_source": ReportSourceResource(path=str(source)),
        },
    )
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=dg.DagsterInstance.ephemeral(),
        tags={PARTITION_RANGE_START: keys[0], PARTITION_RANGE_END: keys[-1]},
    )
    assert result.success

    io_manager = ParquetIOManager(base_uri=str(tmp_path / "artifacts"))
    store = io_manager._store()
    valid = pl.concat([
        pl.read_parquet(store.local_path(io_manager.table_key(dg.AssetKey("reports"), key))) for key in keys
    ])
    invalid = pl.concat([
        pl.read_parquet(store.local_path(io_manager.table_key(dg.AssetKey("invalid_reports"), key))) for key in keys
    ])
    assert sorted(valid["report_id"].to_list()) == ["CXR1", "CXR2", "CXR3", "CXR4"]
    assert sorted(invalid["source_path"].str.split("/").list.last().to_list()) == [
        "empty.xml", "garbage.xml", "truncated.xml"
    ]
    assert invalid["reason"].null_count() == 0

    # Each report sits in the bucket of its id, and nowhere else.
    for key in keys:
        table = pl.read_parquet(store.local_path(io_manager.table_key(dg.AssetKey("reports"), key)))
        assert all(bucket_key(bucket_of(rid, len(keys))) == key for rid in table["report_id"])
