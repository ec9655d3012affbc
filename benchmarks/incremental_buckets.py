"""Cost of re-extraction after one report changed, against the first full backfill.

Extracts the 3,955 Open-i reports that torchxrayvision ships into a folder of XML files and
drives the automation loop a Dagster daemon would run, on a SQLite instance in a temporary
DAGSTER_HOME: observe ``report_files``, evaluate the automation conditions, execute what
they request. It times the first backfill of every bucket (reports, invalid_reports,
report_entities_rules, report_labels, then entity_vocabulary), a tick after no change, and
the loop after editing one report, and prints how many texts the rules extractor ran on.
``--s3`` puts every artifact on a moto S3 server started on 127.0.0.1 instead of a folder.

    .venv/bin/python benchmarks/incremental_buckets.py [--buckets 32] [--s3]
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Only warnings and errors of the runs reach the console.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def extract_openi(folder: Path) -> int:
    from kad_pipeline.reports import openi_tarball_path

    count = 0
    with tarfile.open(openi_tarball_path()) as archive:
        for member in archive:
            if member.isfile() and member.name.endswith(".xml"):
                (folder / Path(member.name).name).write_bytes(archive.extractfile(member).read())
                count += 1
    return count


def start_moto() -> str:
    from moto.server import ThreadedMotoServer

    os.environ.update({
        "AWS_ACCESS_KEY_ID": "benchmark", "AWS_SECRET_ACCESS_KEY": "benchmark",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
    })
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="kad-benchmark")
    return endpoint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--buckets", type=int, default=32, help="number of report buckets (KAD_REPORT_BUCKETS)")
    parser.add_argument("--s3", action="store_true", help="store artifacts on a local moto S3 server")
    args = parser.parse_args()

    # The bucket count is read when the asset modules are imported.
    os.environ["KAD_REPORT_BUCKETS"] = str(args.buckets)
    logging.getLogger("dagster").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="kad-bench-"))
    os.environ["DAGSTER_HOME"] = str(work / "dagster_home")
    (work / "dagster_home").mkdir()
    (work / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")

    import dagster as dg

    from assets import automation, extraction
    from assets import reports as reports_assets
    from assets.partitions import report_buckets
    from kad_pipeline.partitions import bucket_key, bucket_of
    from resources.io_manager import ParquetIOManager
    from resources.reports import ReportSourceResource
    from resources.storage import ArtifactStorageResource

    source = work / "xml"
    source.mkdir()
    count = extract_openi(source)
    endpoint = start_moto() if args.s3 else None
    artifacts = "s3://kad-benchmark/run" if args.s3 else str(work / "artifacts")
    defs = dg.Definitions(
        assets=automation.with_bucket_automation([
            automation.report_files, reports_assets.reports, extraction.report_entities_rules,
            extraction.report_labels, extraction.entity_vocabulary,
        ]),
        jobs=automation.JOBS,
        resources={
            "io_manager": ParquetIOManager(base_uri=artifacts, s3_endpoint_url=endpoint),
            "storage": ArtifactStorageResource(base_uri=artifacts, s3_endpoint_url=endpoint),
            "report_source": ReportSourceResource(path=str(source)),
        },
    )
    instance = dg.DagsterInstance.get()
    graph = defs.resolve_asset_graph()
    job = defs.resolve_implicit_global_asset_job_def()
    keys = report_buckets.get_partition_keys()
    cursor = None

    def observe() -> float:
        started = time.perf_counter()
        assert defs.resolve_job_def(automation.OBSERVE_JOB_NAME).execute_in_process(
            instance=instance, run_config=QUIET
        ).success
        return time.perf_counter() - started

    def tick() -> dict:
        nonlocal cursor
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
        cursor = result.cursor
        return {
            key: result.get_requested_partitions(key)
            for key in graph.materializable_asset_keys
            if result.get_num_requested(key)
        }

    def run(requested: dict) -> None:
        partitioned = {key: parts for key, parts in requested.items() if parts != {None}}
        if partitioned:
            parts = sorted(set().union(*partitioned.values()))
            if len(parts) == 1:
                result = job.execute_in_process(
                    instance=instance, asset_selection=list(partitioned), partition_key=parts[0], run_config=QUIET
                )
            else:
                tags = {"dagster/asset_partition_range_start": parts[0], "dagster/asset_partition_range_end": parts[-1]}
                result = job.execute_in_process(
                    instance=instance, asset_selection=list(partitioned), tags=tags, run_config=QUIET
                )
            assert result.success
        rest = [key for key, parts in requested.items() if parts == {None}]
        if rest:
            assert job.execute_in_process(instance=instance, asset_selection=rest, run_config=QUIET).success

    def settle() -> tuple[float, int]:
        started = time.perf_counter()
        runs = 0
        while requested := tick():
            run(requested)
            runs += 1
        return time.perf_counter() - started, runs

    def rules_extracted() -> int:
        """Return how many texts the latest run of the rules extractor extracted (not cached)."""
        event = instance.get_latest_materialization_event(dg.AssetKey("report_entities_rules"))
        return event.asset_materialization.metadata["extracted"].value

    storage = f"moto S3 at {endpoint}" if args.s3 else "local folder"
    print(f"{count} Open-i reports, {len(keys)} buckets, artifacts on {storage}, {os.cpu_count()} CPUs")
    observed = observe()
    backfill, runs = settle()
    print(f"observe report_files:            {observed:6.2f} s")
    print(f"first backfill ({runs} ticks):        {backfill:6.2f} s  ({rules_extracted()} texts extracted)")

    observed = observe()
    started = time.perf_counter()
    assert tick() == {}
    print(f"no change: observe + tick:       {observed + time.perf_counter() - started:6.2f} s  (nothing requested)")

    target = source / "1.xml"
    target.write_text(target.read_text().replace("within normal limits", "enlarged"))
    observed = observe()
    started = time.perf_counter()
    requested = tick()
    buckets = sorted(set().union(*requested.values()) - {None})
    run(requested)
    bucket_run = time.perf_counter() - started
    extracted = rules_extracted()
    downstream, _ = settle()
    expected = bucket_key(bucket_of("CXR1", len(keys)))
    print(f"one report edited, observe:      {observed:6.2f} s")
    print(
        f"  tick + run of its bucket:      {bucket_run:6.2f} s  (buckets {buckets}, expected [{expected!r}]; "
        f"{extracted} text(s) extracted)"
    )
    print(f"  entity_vocabulary follows:     {downstream:6.2f} s")
    print(f"work folder: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
