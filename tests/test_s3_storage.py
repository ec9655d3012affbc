"""Every artifact on S3: the report and extraction graph against moto's S3 server over HTTP.

The server runs on 127.0.0.1 in this process (``moto.server.ThreadedMotoServer``); boto3
talks to it through ``endpoint_url`` with dummy credentials, as it would to MinIO or Ceph.
Failures are injected with botocore event hooks, on the real request path.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import boto3
import dagster as dg
import polars as pl
import pytest
from moto.server import ThreadedMotoServer

from assets.partitions import report_buckets
from kad_pipeline.parquet import read_lineage, read_parquet
from kad_pipeline.storage import DIR_MANIFEST, ArtifactNotFoundError, ArtifactStore
from resources.io_manager import ParquetIOManager
from test_incremental import REPORTS, AutomationLoop, bucket_of_report, write_openi_xml

BUCKET = "kad-test"
PREFIX = "deployments/ci"
MULTIPART_SIZE = 9 * 1024 * 1024  # over boto3's default 8 MiB multipart threshold: two parts


class InjectedFailure(Exception):
    """The failure a test hook raises in place of a network or process failure."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def s3_endpoint(monkeypatch, tmp_path):
    """Start a moto S3 server on 127.0.0.1 with one bucket; boto3 gets only dummy credentials."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture
def fail_requests(monkeypatch):
    """Install hooks on every S3 client created from now on, recording started and finished calls.

    ``set_rule`` takes a function (operation name, params) -> bool; True fails the call.
    """
    calls: list[tuple[str, dict]] = []
    finished: list[str] = []
    state = {"rule": lambda operation, params: False}
    original_client = boto3.client

    def before(params, model, **_):
        calls.append((model.name, {k: v for k, v in params.items() if k != "Body"}))
        if state["rule"](model.name, params):
            raise InjectedFailure(f"injected failure of {model.name} on {params.get('Key')}")

    def after(model, **_):
        finished.append(model.name)

    def client(*args, **kwargs):
        created = original_client(*args, **kwargs)
        created.meta.events.register("before-parameter-build.s3", before)
        created.meta.events.register("after-call.s3", after)
        return created

    monkeypatch.setattr(boto3, "client", client)

    class Controller:
        def __init__(self):
            self.calls = calls
            self.finished = finished

        def set_rule(self, rule):
            state["rule"] = rule

    return Controller()


def s3_loop(tmp_path: Path, endpoint: str) -> AutomationLoop:
    loop = AutomationLoop(tmp_path, artifacts_uri=f"s3://{BUCKET}/{PREFIX}", s3_endpoint_url=endpoint)
    for number, (findings, impression) in REPORTS.items():
        write_openi_xml(loop.source, number, findings, impression)
    return loop


def test_graph_runs_with_every_artifact_on_s3(tmp_path, s3_endpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loop = s3_loop(tmp_path, s3_endpoint)
    loop.observe()
    loop.settle()

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = {
        item["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        for item in page.get("Contents", [])
    }
    assert all(key.startswith(f"{PREFIX}/") for key in keys)
    buckets = report_buckets.get_partition_keys()
    for asset in ("reports", "invalid_reports", "report_entities_rules", "report_labels"):
        assert {f"{PREFIX}/tables/{asset}/{bucket}.parquet" for bucket in buckets} <= keys, asset
    assert f"{PREFIX}/tables/entity_vocabulary.parquet" in keys
    cache_shards = [key for key in keys if key.startswith(f"{PREFIX}/caches/extraction/rules/")]
    assert len(cache_shards) == len(buckets)
    # Nothing went to a local folder instead.
    assert not (tmp_path / "artifacts").exists()
    assert not (tmp_path / ".kad_artifacts").exists()

    reports = loop.table("reports")
    assert sorted(reports["report_id"]) == [f"CXR{n}" for n in sorted(REPORTS)]
    bucket = bucket_of_report(1)
    lineage = read_lineage(loop.store, ParquetIOManager.table_key(dg.AssetKey("reports"), bucket))
    assert lineage["asset_key"] == "reports"
    assert lineage["partition"] == bucket
    assert lineage["code_version"] == "reports-v1"
    assert lineage["upstream_data_versions"]["report_files"]

    # The extraction cache on S3 serves the unchanged reports of an edited bucket.
    write_openi_xml(loop.source, 1, "Moderate cardiomegaly.", "Cardiomegaly.")
    loop.observe()
    requested = loop.tick()
    assert requested["report_entities_rules"] == {bucket}
    loop.run(requested)
    metadata = loop.latest_metadata("report_entities_rules", bucket)
    assert metadata["extracted"] == 1
    assert metadata["cache_uri"].startswith(f"s3://{BUCKET}/{PREFIX}/caches/extraction/rules/")


def test_failed_table_upload_keeps_previous_version(tmp_path, s3_endpoint, fail_requests):
    loop = s3_loop(tmp_path, s3_endpoint)
    loop.observe()
    loop.settle()
    bucket = bucket_of_report(3)
    table_key = ParquetIOManager.table_key(dg.AssetKey("report_entities_rules"), bucket)
    previous = loop.store.get_bytes(table_key)

    write_openi_xml(loop.source, 3, "Large right pneumothorax.", "Pneumothorax.")
    loop.observe()
    requested = loop.tick()
    assert requested["report_entities_rules"] == {bucket}

    target = f"{PREFIX}/{table_key}"
    fail_requests.set_rule(lambda operation, params: operation == "PutObject" and params["Key"] == target)
    job = loop.defs.resolve_implicit_global_asset_job_def()
    selection = [dg.AssetKey(asset) for asset in requested if asset != "entity_vocabulary"]
    failed = job.execute_in_process(
        instance=loop.instance, asset_selection=selection, partition_key=bucket, raise_on_error=False
    )
    assert not failed.success
    assert any(name == "PutObject" and params["Key"] == target for name, params in fail_requests.calls)

    # Readers still get the whole previous table, byte for byte.
    assert loop.store.get_bytes(table_key) == previous
    old_rows = read_parquet(loop.store, table_key).filter(pl.col("report_id") == "CXR3")
    assert "cardiomegaly" in old_rows["query"].to_list()

    # Once the store accepts writes again, a re-run replaces it.
    fail_requests.set_rule(lambda operation, params: False)
    rerun = job.execute_in_process(instance=loop.instance, asset_selection=selection, partition_key=bucket)
    assert rerun.success
    new_rows = read_parquet(loop.store, table_key).filter(pl.col("report_id") == "CXR3")
    assert "pneumothorax" in new_rows["query"].to_list()


def test_failed_multipart_upload_keeps_previous_object(tmp_path, s3_endpoint, fail_requests):
    store = ArtifactStore(f"s3://{BUCKET}/{PREFIX}", s3_endpoint_url=s3_endpoint)
    old = tmp_path / "old.bin"
    old.write_bytes(b"\x01" * MULTIPART_SIZE)
    store.put_file(old, "checkpoints/kad_model/model.safetensors")

    new = tmp_path / "new.bin"
    new.write_bytes(b"\x02" * MULTIPART_SIZE)
    fail_requests.calls.clear()
    fail_requests.finished.clear()

    def fail_second_part(operation, params):
        if operation != "UploadPart" or params["PartNumber"] != 2:
            return False
        # Parts go up in parallel threads: fail part 2 only once part 1 is stored.
        deadline = time.monotonic() + 30
        while "UploadPart" not in fail_requests.finished and time.monotonic() < deadline:
            time.sleep(0.01)
        return True

    fail_requests.set_rule(fail_second_part)
    with pytest.raises(Exception) as raised:
        store.put_file(new, "checkpoints/kad_model/model.safetensors")
    assert "injected failure" in str(raised.value)
    operations = [name for name, _ in fail_requests.calls]
    assert "CreateMultipartUpload" in operations
    assert ("UploadPart", 1) in [(name, params.get("PartNumber")) for name, params in fail_requests.calls]
    assert fail_requests.finished.count("UploadPart") == 1
    assert "CompleteMultipartUpload" not in operations

    fail_requests.set_rule(lambda operation, params: False)
    assert store.get_bytes("checkpoints/kad_model/model.safetensors") == old.read_bytes()
    # The failed upload was aborted, so no parts linger (and cost storage) on the bucket.
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    assert client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []


def test_interrupted_folder_upload_is_rejected(tmp_path, s3_endpoint, fail_requests):
    store = ArtifactStore(f"s3://{BUCKET}/{PREFIX}", s3_endpoint_url=s3_endpoint)
    for version in ("v1", "v2"):
        folder = tmp_path / version
        folder.mkdir()
        (folder / "config.json").write_text(f'{{"version": "{version}"}}')
        (folder / "model.safetensors").write_bytes(version.encode() * 1000)
    store.put_dir(tmp_path / "v1", "checkpoints/run-1")

    # The second upload dies after its first file, before the manifest.
    fail_requests.set_rule(
        lambda operation, params: operation == "PutObject" and params["Key"].endswith("run-2/model.safetensors")
    )
    with pytest.raises(InjectedFailure):
        store.put_dir(tmp_path / "v2", "checkpoints/run-2")
    fail_requests.set_rule(lambda operation, params: False)

    assert store.exists("checkpoints/run-2/config.json")
    assert not store.exists(f"checkpoints/run-2/{DIR_MANIFEST}")
    with pytest.raises(ArtifactNotFoundError, match="did not finish"):
        store.get_dir("checkpoints/run-2", tmp_path / "copy-2")
    copy = store.get_dir("checkpoints/run-1", tmp_path / "copy-1")
    assert (copy / "config.json").read_text() == '{"version": "v1"}'
    assert (copy / "model.safetensors").read_bytes() == b"v1" * 1000
