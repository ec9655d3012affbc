"""LLM extractor against a scripted OpenAI-compatible server on 127.0.0.1, using the real openai client."""

import email.utils
import hashlib
import logging
import random
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest

from kad_pipeline.extraction.llm import (
    LLMConfig,
    LLMExtractor,
    PublicEndpointError,
    backoff_seconds,
    check_endpoint,
    extract_with_llm_from_args,
    retry_after_seconds,
)
from kad_pipeline.extraction.llm_cache import AnswerCache, RateLimiter
from kad_pipeline.extraction.llm_prompt import PROMPT_VERSION, AnswerFormatError, parse_answer
from kad_pipeline.queries import KAD_QUERIES
from llm_server import COMPLETION_TOKENS, PROMPT_TOKENS, ChatServer

SECRET = "sk-test-secret-0123456789"
SERVER_SCRIPT = Path(__file__).with_name("llm_server.py")


@pytest.fixture()
def server():
    with ChatServer(slow_seconds=2.0, api_key=SECRET) as running:
        yield running


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("KAD_TEST_LLM_KEY", SECRET)


def make_config(base_url: str, cache_dir: Path, **overrides) -> LLMConfig:
    settings = dict(
        base_url=base_url,
        model="test-model",
        api_key_env="KAD_TEST_LLM_KEY",
        cache_dir=str(cache_dir),
        concurrency=2,
        requests_per_minute=None,
        timeout=5.0,
        max_retries=2,
        backoff_base=0.01,
        backoff_max=0.05,
    )
    settings.update(overrides)
    return LLMConfig(**settings)


def reports_of(*texts: str) -> pl.DataFrame:
    return pl.DataFrame({"report_id": [f"r{index}" for index in range(len(texts))], "text": list(texts)})


# --------------------------------------------------------------------------------------------
# Endpoint guard
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["https://api.openai.com/v1", "https://API.OpenAI.com", "https://chatgpt.com/v1"])
def test_public_endpoint_rejected(url):
    with pytest.raises(PublicEndpointError, match="MIMIC-CXR data use agreement") as raised:
        check_endpoint(url)
    assert "allow_public_endpoint" in str(raised.value)


def test_public_endpoint_allowed_with_flag():
    assert check_endpoint("https://api.openai.com/v1", allow_public_endpoint=True) == "https://api.openai.com/v1"


@pytest.mark.parametrize(
    "url", ["https://my-resource.openai.azure.com", "http://127.0.0.1:8000/v1", "https://llm.hospital.example/v1"]
)
def test_other_endpoints_allowed(url):
    assert check_endpoint(url) == url


@pytest.mark.parametrize("url", [None, "", "api.openai.com/v1", "ftp://127.0.0.1/v1"])
def test_invalid_endpoint(url):
    with pytest.raises(ValueError, match="base_url"):
        check_endpoint(url)


def test_extractor_rejects_public_endpoint(tmp_path):
    with pytest.raises(PublicEndpointError):
        LLMExtractor(make_config("https://api.openai.com/v1", tmp_path))


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def test_retry_after_parsing():
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({}) is None
    assert retry_after_seconds({"retry-after": "soon"}) is None
    in_ten = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8.0 <= retry_after_seconds({"retry-after": in_ten}) <= 10.0


def test_backoff_bounds():
    rng = random.Random(0)
    for attempt, ceiling in [(0, 1.0), (1, 2.0), (3, 8.0), (10, 30.0)]:
        for _ in range(50):
            delay = backoff_seconds(attempt, base=1.0, maximum=30.0, rng=rng)
            assert ceiling / 2 <= delay <= ceiling


def test_rate_limiter_spacing():
    limiter = RateLimiter(requests_per_minute=600)  # one start per 0.1 s
    started = time.monotonic()
    for _ in range(4):
        limiter.acquire()
    assert time.monotonic() - started >= 0.3 - 0.01
    with pytest.raises(ValueError, match="requests_per_minute"):
        RateLimiter(0)


def test_parse_answer_items():
    content = (
        '{"findings": [{"name": "Pleural Effusion", "status": "absent", "evidence": "no effusion"},'
        ' {"name": "edema", "status": "likely", "evidence": "x"},'
        ' {"name": "fibrosis", "status": "present", "evidence": "y"}, 7]}'
    )
    parsed = parse_answer(content, KAD_QUERIES)
    assert [(finding.name, finding.status) for finding in parsed.findings] == [("pleural effusion", "absent")]
    assert [item["reason"] for item in parsed.rejected] == ["invalid-status", "unknown-finding", "invalid-item"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [(None, "empty-answer"), ("", "empty-answer"), ("{oops", "malformed-json"), ('{"labels": []}', "schema-mismatch")],
)
def test_parse_answer_unusable(content, reason):
    with pytest.raises(AnswerFormatError) as raised:
        parse_answer(content, KAD_QUERIES)
    assert raised.value.reason == reason


# --------------------------------------------------------------------------------------------
# Against the server
# --------------------------------------------------------------------------------------------


def test_normal_answers(server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    reports = reports_of(
        "Small pleural effusion. No pneumothorax.",
        "Possible pneumonia in the left base.",
        "Heart size normal.",
    )
    config = make_config(
        server.base_url, tmp_path / "cache", prompt_price_per_million=2.0, completion_price_per_million=8.0
    )
    extractor = LLMExtractor(config)
    result = extractor.extract(reports)

    rows = result.entities.sort("report_id", "char_start").select("report_id", "query", "category").rows()
    assert rows == [
        ("r0", "pleural effusion", "OBS-DP"),
        ("r0", "pneumothorax", "OBS-DA"),
        ("r1", "pneumonia", "OBS-U"),
    ]
    effusion = result.entities.filter(pl.col("query") == "pleural effusion").row(0, named=True)
    assert (effusion["char_start"], effusion["char_end"], effusion["entity"]) == (6, 22, "pleural effusion")
    assert effusion["sentence_index"] == 0
    pneumothorax = result.entities.filter(pl.col("query") == "pneumothorax").row(0, named=True)
    assert pneumothorax["sentence_index"] == 1
    assert set(result.entities["extractor_version"].to_list()) == {f"llm:test-model:{PROMPT_VERSION}"}
    assert result.failures.height == 0

    assert result.usage.requests == 3
    assert result.usage.prompt_tokens == 3 * PROMPT_TOKENS
    assert result.usage.completion_tokens == 3 * COMPLETION_TOKENS
    assert result.usage.estimated_cost_usd == pytest.approx((300 * 2.0 + 60 * 8.0) / 1e6)

    body = server.state.bodies[0]
    assert body["model"] == "test-model"
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["strict"] is True
    assert server.state.headers[0]["authorization"] == f"Bearer {SECRET}"
    assert SECRET not in caplog.text


def test_cache_avoids_second_request(server, tmp_path):
    reports = reports_of("No pneumothorax.", "Cardiomegaly.", "Cardiomegaly.")
    config = make_config(server.base_url, tmp_path / "cache")
    first = LLMExtractor(config).extract(reports)
    # Two reports with the same text share one request.
    assert first.usage.requests == 2
    assert len(AnswerCache(tmp_path / "cache")) == 2

    second = LLMExtractor(config).extract(reports)
    assert server.state.requests == 2
    assert second.usage.cache_hits == 2
    assert second.usage.requests == 0
    assert second.entities.sort("report_id").rows() == first.entities.sort("report_id").rows()

    changed = reports_of("No pneumothorax.", "Cardiomegaly and edema.", "Cardiomegaly.")
    third = LLMExtractor(config).extract(changed)
    assert third.usage.requests == 1
    assert server.state.requests == 3

    other_model = LLMExtractor(make_config(server.base_url, tmp_path / "cache", model="other-model"))
    assert other_model.extract(reports).usage.requests == 2


def test_malformed_answer_recorded(server, tmp_path):
    config = make_config(server.base_url, tmp_path / "cache")
    result = LLMExtractor(config).extract(reports_of("Edema. [malformed]", "Edema."))
    assert result.failures.select("report_id", "reason").rows() == [("r0", "malformed-json")]
    assert result.entities["report_id"].to_list() == ["r1"]
    # The unusable answer is not cached, so a re-run asks again.
    rerun = LLMExtractor(config).extract(reports_of("Edema. [malformed]", "Edema."))
    assert rerun.usage.requests == 1


def test_unknown_label_recorded(server, tmp_path):
    result = LLMExtractor(make_config(server.base_url, tmp_path / "cache")).extract(reports_of("Edema. [unknown-label]"))
    assert result.entities["query"].to_list() == ["edema"]
    rejected = result.rejected_findings.row(0, named=True)
    assert (rejected["report_id"], rejected["name"], rejected["reason"]) == ("r0", "pulmonary fibrosis", "unknown-finding")
    # Answers with rejected items are cached and still report the rejected item on a re-run.
    again = LLMExtractor(make_config(server.base_url, tmp_path / "cache")).extract(reports_of("Edema. [unknown-label]"))
    assert again.usage.requests == 0
    assert again.rejected_findings.height == 1


def test_429_honors_retry_after(server, tmp_path):
    config = make_config(server.base_url, tmp_path / "cache", concurrency=1)
    started = time.monotonic()
    result = LLMExtractor(config).extract(reports_of("Edema. [429-once]"))
    elapsed = time.monotonic() - started
    assert result.failures.height == 0
    assert result.entities["query"].to_list() == ["edema"]
    assert result.usage.requests == 2
    assert result.usage.retries == 1
    # The server asked for 1 s; the backoff alone is at most 0.05 s.
    assert elapsed >= 1.0


@pytest.mark.parametrize(("marker", "reason"), [("[429-always]", "http-429"), ("[500-always]", "http-500")])
def test_persistent_errors_recorded(server, tmp_path, marker, reason):
    config = make_config(server.base_url, tmp_path / "cache", max_retries=1, max_retry_after=0.0)
    result = LLMExtractor(config).extract(reports_of(f"Edema. {marker}", "Edema."))
    failure = result.failures.row(0, named=True)
    assert (failure["report_id"], failure["reason"]) == ("r0", reason)
    assert result.entities["report_id"].to_list() == ["r1"]


def test_500_once_retried(server, tmp_path):
    result = LLMExtractor(make_config(server.base_url, tmp_path / "cache")).extract(reports_of("Edema. [500-once]"))
    assert result.failures.height == 0
    assert result.usage.requests == 2


def test_timeout_recorded(server, tmp_path):
    config = make_config(server.base_url, tmp_path / "cache", timeout=0.3, max_retries=1)
    result = LLMExtractor(config).extract(reports_of("Edema. [slow-always]", "Edema. [slow-once]"))
    assert result.failures.select("report_id", "reason").rows() == [("r0", "timeout")]
    assert result.entities["report_id"].to_list() == ["r1"]


def test_wrong_key_aborts_run(server, tmp_path, monkeypatch):
    monkeypatch.setenv("KAD_TEST_LLM_KEY", "sk-wrong")
    config = make_config(server.base_url, tmp_path / "cache", concurrency=1)
    result = LLMExtractor(config).extract(reports_of("Edema.", "Cardiomegaly.", "Mass."))
    assert result.failures.height == 3
    assert result.failures["reason"].to_list().count("http-401") == 1
    assert result.failures["reason"].to_list().count("aborted") == 2
    assert server.state.requests == 1
    assert "KAD_TEST_LLM_KEY" in result.failures["detail"][0]


def test_azure_client(server, tmp_path):
    config = make_config(server.url, tmp_path / "cache", azure=True, model="kad-deployment")
    result = LLMExtractor(config).extract(reports_of("Edema."))
    assert result.entities["query"].to_list() == ["edema"]
    assert server.state.paths[0].startswith("/openai/deployments/kad-deployment/chat/completions?api-version=")
    assert server.state.headers[0]["api-key"] == SECRET


def test_cli_entry_point(server, tmp_path):
    args = SimpleNamespace(
        base_url=server.base_url,
        model="test-model",
        api_key_env="KAD_TEST_LLM_KEY",
        cache_dir=str(tmp_path / "cache"),
        concurrency=1,
        allow_public_endpoint=False,
    )
    entities = extract_with_llm_from_args(reports_of("No edema.", "Mass."), args)
    assert entities.sort("report_id").select("report_id", "query", "category").rows() == [
        ("r0", "edema", "OBS-DA"),
        ("r1", "mass", "OBS-DP"),
    ]


def _start_server_process(*arguments: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, str(SERVER_SCRIPT), *arguments], stdout=subprocess.PIPE, text=True
    )
    port = process.stdout.readline().strip()
    return process, f"http://127.0.0.1:{port}/v1"


def _stats(base_url: str) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/stats", timeout=5) as response:
        return json.loads(response.read())


def test_server_killed_mid_run(tmp_path):
    texts = [f"Report {index}: edema." for index in range(10)]
    reports = reports_of(*texts)
    cache_dir = tmp_path / "cache"

    dying, base_url = _start_server_process("--die-after", "4")
    try:
        config = make_config(base_url, cache_dir, concurrency=2, max_retries=1)
        first = LLMExtractor(config).extract(reports)
    finally:
        dying.kill()
        dying.wait()
    assert dying.returncode is not None
    assert len(AnswerCache(cache_dir)) == 4
    assert first.failures.height == 6
    assert set(first.failures["reason"].to_list()) <= {"connection-error", "timeout"}
    assert first.entities["report_id"].n_unique() == 4

    fresh, base_url = _start_server_process()
    try:
        second = LLMExtractor(make_config(base_url, cache_dir, concurrency=2)).extract(reports)
        stats = _stats(base_url)
    finally:
        fresh.kill()
        fresh.wait()
    assert stats["requests"] == 6
    assert second.usage.cache_hits == 4
    assert second.failures.height == 0
    assert sorted(second.entities["report_id"].to_list()) == sorted(reports["report_id"].to_list())


def _llm_asset_run(tmp_path, llm_resource, texts, max_failed_fraction):
    import dagster as dg

    from assets import extraction_models
    from assets.partitions import partition_output, report_buckets, single_run, split_by_bucket
    from resources.io_manager import ParquetIOManager
    from resources.storage import ArtifactStorageResource

    @dg.asset(partitions_def=report_buckets, backfill_policy=single_run)
    def reports(context):
        table = pl.DataFrame({"report_id": [f"CXR{i}" for i in range(len(texts))], "text": texts}).with_columns(
            pl.col("text").map_elements(lambda text: hashlib.sha256(text.encode()).hexdigest(), return_dtype=pl.String)
            .alias("text_sha256")
        )
        return partition_output(context, split_by_bucket(table, context.partition_keys))

    defs = dg.Definitions(
        assets=[reports, extraction_models.report_entities_llm],
        resources={
            "io_manager": ParquetIOManager(base_uri=str(tmp_path / "artifacts")),
            "storage": ArtifactStorageResource(base_uri=str(tmp_path / "artifacts")),
            "llm": llm_resource,
        },
    )
    keys = report_buckets.get_partition_keys()
    return defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=dg.DagsterInstance.ephemeral(),
        tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]},
        run_config={"ops": {"report_entities_llm": {"config": {"max_failed_fraction": max_failed_fraction}}}},
        raise_on_error=False,
    )


def test_llm_asset_failure_threshold(server, tmp_path):
    from resources.llm import LLMExtractorResource

    resource = LLMExtractorResource(
        base_url=server.base_url,
        model="test-model",
        api_key_env="KAD_TEST_LLM_KEY",
        cache_dir=str(tmp_path / "cache"),
        requests_per_minute=None,
        max_retries=0,
    )
    texts = ["Edema.", "Mass.", "Edema. [500-always]"]

    strict = _llm_asset_run(tmp_path, resource, texts, max_failed_fraction=0.1)
    assert not strict.success
    assert strict.asset_materializations_for_node("report_entities_llm") == []

    lenient = _llm_asset_run(tmp_path, resource, texts, max_failed_fraction=0.5)
    assert lenient.success
    metadata = lenient.asset_materializations_for_node("report_entities_llm")[0].metadata
    assert metadata["failed_reports"].value == 1
    assert metadata["failures_by_reason"].value == {"http-500": 1}
    # The strict run cached the two answers; the second run asked only for the failing report.
    assert metadata["cache_hits"].value == 2
    assert server.state.requests == 3 + 1
