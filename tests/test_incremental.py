"""Incremental re-extraction: Dagster's automation evaluation re-runs exactly the changed buckets.

Each test drives the real loop on a real (ephemeral) Dagster instance: execute the
observation job of ``report_files``, evaluate the automation conditions with
``dg.evaluate_automation_conditions``, and execute the requested partitions.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import defaultdict
from pathlib import Path
from xml.sax.saxutils import escape

import dagster as dg
import polars as pl
import pytest

from assets import automation, extraction
from assets import reports as reports_assets
from assets.partitions import N_BUCKETS, report_buckets
from kad_pipeline.extraction.cache import ExtractionCache
from kad_pipeline.parquet import read_parquet
from kad_pipeline.partitions import bucket_key, bucket_of
from kad_pipeline.storage import ArtifactStore
from resources.io_manager import ParquetIOManager
from resources.reports import ReportSourceResource
from resources.storage import ArtifactStorageResource

RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"

REPORTS = {
    1: ("The heart is normal in size. There is no pleural effusion.", "No acute disease."),
    2: ("There is a small right pleural effusion.", "Right pleural effusion."),
    3: ("Mild cardiomegaly. Lungs are clear.", "Cardiomegaly."),
    4: ("No pneumothorax. No focal consolidation.", "Normal chest."),
    5: ("Left lower lobe atelectasis.", "Atelectasis."),
    6: ("Possible pneumonia in the right lower lobe.", "Possible pneumonia."),
}

HAS_LLM_ASSET = importlib.util.find_spec("assets.extraction_models") is not None
sys.path.insert(0, str(Path(__file__).resolve().parent))


def write_openi_xml(folder: Path, number: int, findings: str, impression: str) -> Path:
    """Write one report in the Open-i XML layout (uId, AbstractText sections, MeSH, parentImage)."""
    path = folder / f"{number}.xml"
    path.write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n'
        "<eCitation>\n"
        f'  <uId id="CXR{number}"/>\n'
        "  <MedlineCitation><Article><Abstract>\n"
        '    <AbstractText Label="COMPARISON">None.</AbstractText>\n'
        f'    <AbstractText Label="FINDINGS">{escape(findings)}</AbstractText>\n'
        f'    <AbstractText Label="IMPRESSION">{escape(impression)}</AbstractText>\n'
        "  </Abstract></Article></MedlineCitation>\n"
        "  <MeSH><major>normal</major></MeSH>\n"
        f'  <parentImage id="CXR{number}_1_IM-{number:04d}-1001"><figureId>F1</figureId></parentImage>\n'
        "</eCitation>\n",
        encoding="utf-8",
    )
    return path


class AutomationLoop:
    """One code location, one instance and the automation cursor, as the daemon would keep them."""

    def __init__(self, tmp_path: Path, extra_assets=(), extra_resources=None, artifacts_uri=None, s3_endpoint_url=None):
        self.source = tmp_path / "xml"
        self.source.mkdir()
        self.artifacts = artifacts_uri or str(tmp_path / "artifacts")
        self.store = ArtifactStore(self.artifacts, s3_endpoint_url=s3_endpoint_url)
        assets = automation.with_bucket_automation([
            automation.report_files,
            reports_assets.reports,
            extraction.report_entities_rules,
            extraction.report_labels,
            extraction.entity_vocabulary,
            *extra_assets,
        ])
        self.defs = dg.Definitions(
            assets=assets,
            jobs=automation.JOBS,
            schedules=automation.SCHEDULES,
            sensors=automation.SENSORS,
            resources={
                "io_manager": ParquetIOManager(base_uri=self.artifacts, s3_endpoint_url=s3_endpoint_url),
                "storage": ArtifactStorageResource(base_uri=self.artifacts, s3_endpoint_url=s3_endpoint_url),
                "report_source": ReportSourceResource(path=str(self.source)),
                **(extra_resources or {}),
            },
        )
        self.instance = dg.DagsterInstance.ephemeral()
        self.cursor = None
        self.graph = self.defs.resolve_asset_graph()

    def observe(self) -> None:
        job = self.defs.resolve_job_def(automation.OBSERVE_JOB_NAME)
        assert job.execute_in_process(instance=self.instance).success

    def tick(self) -> dict[str, set[str | None]]:
        """Evaluate every automation condition once; return the requested partitions by asset."""
        result = dg.evaluate_automation_conditions(defs=self.defs, instance=self.instance, cursor=self.cursor)
        self.cursor = result.cursor
        requested = {}
        for key in self.graph.materializable_asset_keys:
            partitions = result.get_requested_partitions(key) if result.get_num_requested(key) else set()
            if partitions:
                requested[key.to_user_string()] = set(partitions)
        return requested

    def run(self, requested: dict[str, set[str | None]]) -> list[dg.ExecuteInProcessResult]:
        """Execute requested partitions the way a single-run backfill would: one run per range."""
        job = self.defs.resolve_implicit_global_asset_job_def()
        keys = report_buckets.get_partition_keys()
        by_partitions: dict[tuple[str, ...], list[dg.AssetKey]] = defaultdict(list)
        for asset, partitions in requested.items():
            if partitions != {None}:
                by_partitions[tuple(sorted(partitions))].append(dg.AssetKey(asset))
        results = []
        for partitions, assets in sorted(by_partitions.items()):
            if len(partitions) == 1:
                result = job.execute_in_process(instance=self.instance, asset_selection=assets, partition_key=partitions[0])
            else:
                assert list(partitions) == keys[keys.index(partitions[0]): keys.index(partitions[-1]) + 1]
                tags = {RANGE_START: partitions[0], RANGE_END: partitions[-1]}
                result = job.execute_in_process(instance=self.instance, asset_selection=assets, tags=tags)
            assert result.success
            results.append(result)
        unpartitioned = [dg.AssetKey(asset) for asset, partitions in requested.items() if partitions == {None}]
        if unpartitioned:
            result = job.execute_in_process(instance=self.instance, asset_selection=unpartitioned)
            assert result.success
            results.append(result)
        return results

    def settle(self, max_ticks: int = 5) -> list[dict[str, set[str | None]]]:
        """Tick and run until a tick requests nothing; return what each tick requested."""
        history = []
        for _ in range(max_ticks):
            requested = self.tick()
            if not requested:
                return history
            self.run(requested)
            history.append(requested)
        raise AssertionError(f"automation still requests runs after {max_ticks} ticks: {history}")

    def table(self, asset: str) -> pl.DataFrame:
        node = self.graph.get(dg.AssetKey(asset))
        if not node.is_partitioned:
            return read_parquet(self.store, ParquetIOManager.table_key(dg.AssetKey(asset)))
        frames = [
            read_parquet(self.store, ParquetIOManager.table_key(dg.AssetKey(asset), key))
            for key in report_buckets.get_partition_keys()
        ]
        return pl.concat(frames, how="diagonal_relaxed")

    def latest_metadata(self, asset: str, partition: str) -> dict:
        event = self.instance.get_latest_materialization_event(dg.AssetKey(asset))
        materialization = event.asset_materialization
        assert materialization.partition == partition
        return {name: value.value for name, value in materialization.metadata.items()}


def bucket_of_report(number: int) -> str:
    return bucket_key(bucket_of(f"CXR{number}", N_BUCKETS))


PER_REPORT_ASSETS = {"reports", "invalid_reports", "report_entities_rules", "report_labels"}


@pytest.fixture
def loop(tmp_path):
    loop = AutomationLoop(tmp_path)
    for number, (findings, impression) in REPORTS.items():
        write_openi_xml(loop.source, number, findings, impression)
    return loop


def test_nothing_runs_before_first_observation(loop):
    assert loop.tick() == {}


def test_first_tick_backfills_every_bucket(loop):
    loop.observe()
    requested = loop.tick()
    every_bucket = set(report_buckets.get_partition_keys())
    for asset in PER_REPORT_ASSETS:
        assert requested[asset] == every_bucket, asset
    # The vocabulary reads every bucket, so it waits until they exist.
    assert "entity_vocabulary" not in requested

    loop.run(requested)
    assert loop.tick() == {"entity_vocabulary": {None}}
    assert sorted(loop.table("reports")["report_id"]) == [f"CXR{n}" for n in sorted(REPORTS)]
    assert sorted(loop.table("report_labels")["report_id"]) == [f"CXR{n}" for n in sorted(REPORTS)]
    assert set(loop.table("report_entities_rules")["report_id"]) <= {f"CXR{n}" for n in REPORTS}


def test_unchanged_reports_request_nothing(loop):
    loop.observe()
    loop.settle()
    assert loop.tick() == {}

    # A new observation of the same contents records the same data versions.
    loop.observe()
    assert loop.tick() == {}

    # Rewriting a file with identical contents changes its time but not its data version.
    write_openi_xml(loop.source, 2, *REPORTS[2])
    loop.observe()
    assert loop.tick() == {}


def test_edited_report_reruns_only_its_bucket(loop):
    loop.observe()
    loop.settle()
    entities_before = loop.table("report_entities_rules")

    write_openi_xml(loop.source, 3, "Large right pneumothorax.", "Pneumothorax.")
    loop.observe()
    requested = loop.tick()
    bucket = bucket_of_report(3)
    for asset in PER_REPORT_ASSETS:
        assert requested[asset] == {bucket}, asset
    assert set(requested) == PER_REPORT_ASSETS

    loop.run(requested)
    # The vocabulary aggregates every bucket and follows on the next tick.
    assert loop.settle() == [{"entity_vocabulary": {None}}]
    metadata = loop.latest_metadata("report_entities_rules", bucket)
    reports_in_bucket = sum(1 for number in REPORTS if bucket_of_report(number) == bucket)
    assert metadata["extracted"] == 1
    assert metadata["cache_hits"] == reports_in_bucket - 1

    entities_after = loop.table("report_entities_rules")
    edited = entities_after.filter(pl.col("report_id") == "CXR3")
    assert "pneumothorax" in edited["query"].to_list()
    assert "cardiomegaly" not in edited["query"].to_list()
    # Every other report keeps exactly the rows it had.
    others_before = entities_before.filter(pl.col("report_id") != "CXR3").sort(pl.all())
    others_after = entities_after.filter(pl.col("report_id") != "CXR3").sort(pl.all())
    assert others_after.equals(others_before)

    labels = loop.table("report_labels").filter(pl.col("report_id") == "CXR3")
    assert labels["pneumothorax"].to_list() == [1]


def test_deleted_report_leaves_every_output(loop):
    loop.observe()
    loop.settle()
    assert "atelectasis" in loop.table("entity_vocabulary")["query"].to_list()

    (loop.source / "5.xml").unlink()
    loop.observe()
    requested = loop.tick()
    for asset in PER_REPORT_ASSETS:
        assert requested[asset] == {bucket_of_report(5)}, asset
    loop.run(requested)
    assert loop.settle() == [{"entity_vocabulary": {None}}]

    for asset in ("reports", "report_entities_rules", "report_labels"):
        ids = set(loop.table(asset)["report_id"].to_list())
        assert "CXR5" not in ids, asset
    assert sorted(loop.table("reports")["report_id"]) == [f"CXR{n}" for n in sorted(REPORTS) if n != 5]
    # CXR5 was the only report that mentioned atelectasis.
    assert "atelectasis" not in loop.table("entity_vocabulary")["query"].to_list()

    # Its cache entry is dropped too, so the shard holds only texts the bucket still has.
    node = loop.graph.get(dg.AssetKey("report_entities_rules"))
    assert node.is_partitioned
    metadata = loop.latest_metadata("report_entities_rules", bucket_of_report(5))
    shard = read_parquet(loop.store, f"{metadata['cache_uri']}/{bucket_of_report(5)}.parquet")
    bucket_reports = loop.table("reports").filter(
        pl.col("report_id").map_elements(lambda rid: bucket_key(bucket_of(rid, N_BUCKETS)), return_dtype=pl.String)
        == bucket_of_report(5)
    )
    assert sorted(shard["text_sha256"]) == sorted(bucket_reports["text_sha256"].unique())


@pytest.mark.skipif(not HAS_LLM_ASSET, reason="assets/extraction_models.py (the LLM extractor asset) is not present")
def test_edited_report_costs_one_llm_request(tmp_path, monkeypatch):
    from assets.extraction_models import report_entities_llm
    from llm_server import ChatServer
    from resources.llm import LLMExtractorResource

    monkeypatch.setenv("KAD_TEST_LLM_KEY", "test-key")
    with ChatServer() as server:
        llm = LLMExtractorResource(
            base_url=server.base_url, model="scripted", api_key_env="KAD_TEST_LLM_KEY",
            cache_dir=str(tmp_path / "llm_cache"), requests_per_minute=None, max_retries=0,
        )
        loop = AutomationLoop(tmp_path, extra_assets=[report_entities_llm], extra_resources={"llm": llm})
        for number, (findings, impression) in REPORTS.items():
            write_openi_xml(loop.source, number, findings, impression)

        loop.observe()
        first = loop.tick()
        assert first["report_entities_llm"] == set(report_buckets.get_partition_keys())
        loop.run(first)
        loop.settle()
        assert server.state.requests == len(REPORTS)

        loop.observe()
        assert loop.tick() == {}
        assert server.state.requests == len(REPORTS)

        write_openi_xml(loop.source, 2, "There is a small left pleural effusion.", "Left pleural effusion.")
        loop.observe()
        requested = loop.tick()
        assert requested["report_entities_llm"] == {bucket_of_report(2)}
        loop.run(requested)
        loop.settle()
        assert server.state.requests == len(REPORTS) + 1

        (loop.source / "6.xml").unlink()
        loop.observe()
        requested = loop.tick()
        assert requested["report_entities_llm"] == {bucket_of_report(6)}
        loop.run(requested)
        loop.settle()
        assert server.state.requests == len(REPORTS) + 1
        assert "CXR6" not in loop.table("report_entities_llm")["report_id"].to_list()
        assert "CXR2" in loop.table("report_entities_llm")["report_id"].to_list()


def test_schedule_and_sensor_ship_stopped(loop):
    schedule = loop.defs.resolve_schedule_def(automation.OBSERVE_SCHEDULE_NAME)
    sensor = loop.defs.resolve_sensor_def(automation.AUTOMATION_SENSOR_NAME)
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    assert schedule.job_name == automation.OBSERVE_JOB_NAME

    # A tick of the schedule requests a run of the observation job, which records the versions.
    context = dg.build_schedule_context(instance=loop.instance)
    run_requests = schedule.evaluate_tick(context).run_requests
    assert len(run_requests) == 1
    loop.observe()
    observed = loop.instance.fetch_observations(dg.AssetKey("report_files"), limit=2 * N_BUCKETS).records
    assert sorted(record.partition_key for record in observed) == report_buckets.get_partition_keys()

    # Later observations record only the buckets whose version changed.
    loop.observe()
    assert len(loop.instance.fetch_observations(dg.AssetKey("report_files"), limit=2 * N_BUCKETS).records) == N_BUCKETS
    write_openi_xml(loop.source, 4, "Small left pleural effusion.", "Effusion.")
    loop.observe()
    latest = loop.instance.fetch_observations(dg.AssetKey("report_files"), limit=2 * N_BUCKETS).records
    assert len(latest) == N_BUCKETS + 1
    assert latest[0].partition_key == bucket_of_report(4)


def test_bucket_versions_follow_contents_only(tmp_path):
    from kad_pipeline.reports import iter_raw_reports

    first = tmp_path / "first"
    second = tmp_path / "second"
    for folder in (first, second):
        folder.mkdir()
        for number, (findings, impression) in REPORTS.items():
            write_openi_xml(folder, number, findings, impression)
    versions = automation.bucket_data_versions(iter_raw_reports(first), N_BUCKETS)
    assert versions == automation.bucket_data_versions(iter_raw_reports(second), N_BUCKETS)
    assert set(versions) == set(report_buckets.get_partition_keys())

    write_openi_xml(second, 4, "Small left pleural effusion.", "Effusion.")
    changed = automation.bucket_data_versions(iter_raw_reports(second), N_BUCKETS)
    differing = {key for key in versions if versions[key] != changed[key]}
    assert differing == {bucket_of_report(4)}


def test_cache_calls_extractor_only_for_new_texts(tmp_path):
    calls: list[list[str]] = []

    def count_words(frame: pl.DataFrame) -> pl.DataFrame:
        calls.append(frame["report_id"].to_list())
        return pl.DataFrame(
            {"report_id": frame["report_id"], "words": frame["text"].str.split(" ").list.len().cast(pl.Int32)}
        )

    def reports_frame(texts: dict[str, str]) -> pl.DataFrame:
        import hashlib

        return pl.DataFrame({
            "report_id": list(texts),
            "text": list(texts.values()),
            "text_sha256": [hashlib.sha256(text.encode()).hexdigest() for text in texts.values()],
        })

    store = ArtifactStore(str(tmp_path / "artifacts"))
    buckets = report_buckets.get_partition_keys()
    cache = ExtractionCache(store, "words", "v1", N_BUCKETS)
    texts = {"a": "one two", "b": "one two three", "c": "one two"}
    first = cache.extract(reports_frame(texts), count_words, buckets)
    assert sorted(first.table.rows()) == [("a", 2), ("b", 3), ("c", 2)]
    assert first.misses == 2  # "a" and "c" share one text

    texts["b"] = "one"
    second = cache.extract(reports_frame(texts), count_words, buckets)
    assert calls[-1] == ["b"]
    assert second.hits == 1
    assert sorted(second.table.rows()) == [("a", 2), ("b", 1), ("c", 2)]

    # Another extractor version never reuses these entries.
    other = ExtractionCache(store, "words", "v2", N_BUCKETS).extract(reports_frame(texts), count_words, buckets)
    assert other.misses == 2
    assert len(calls) == 3


def test_cache_keeps_failed_texts_uncached(tmp_path):
    import hashlib

    reports = pl.DataFrame({
        "report_id": ["r1", "r2"],
        "text": ["fine", "fails"],
        "text_sha256": [hashlib.sha256(text.encode()).hexdigest() for text in ("fine", "fails")],
    })
    calls: list[list[str]] = []

    def flaky(frame: pl.DataFrame):
        calls.append(frame["report_id"].to_list())
        rows = pl.DataFrame({"report_id": frame["report_id"], "entity": frame["text"]})
        return rows, {"r2"}

    cache = ExtractionCache(ArtifactStore(str(tmp_path)), "flaky", "v1", N_BUCKETS)
    first = cache.extract(reports, flaky, report_buckets.get_partition_keys())
    assert first.table["report_id"].to_list() == ["r1"]
    assert first.failed == 1
    cache.extract(reports, flaky, report_buckets.get_partition_keys())
    assert calls == [["r1", "r2"], ["r2"]]
