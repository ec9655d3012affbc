"""RadGraph JSON conversion, query normalization, and running the RadGraph runner in another interpreter."""

import json
import os
import sys
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from kad_pipeline.extraction.radgraph import (
    ENTITY_SCHEMA,
    QueryMatcher,
    RadGraphFormatError,
    RadGraphUnavailableError,
    align_tokens,
    category_of_label,
    check_radgraph_environment,
    convert_radgraph,
    entities_from_radgraph_json,
    load_radgraph_json,
    raise_for_runner_failure,
    report_id_of_key,
    run_radgraph,
    runner_command,
    write_runner_input,
)
from kad_pipeline.queries import KAD_QUERIES

FIXTURES = Path(__file__).parent / "fixtures" / "radgraph"
FAKE_ENV = FIXTURES / "fake_env"


@pytest.fixture()
def reports() -> pl.DataFrame:
    texts = json.loads((FIXTURES / "reports.json").read_text())
    return pl.DataFrame({"report_id": list(texts), "text": list(texts.values())})


@pytest.fixture()
def converted(reports):
    return convert_radgraph(load_radgraph_json(FIXTURES / "radgraph_sample.json"), KAD_QUERIES, reports)


def fake_env_vars() -> dict[str, str]:
    """Environment of a RadGraph interpreter whose radgraph and transformers are the test stand-ins."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONPATH"] = str(FAKE_ENV)
    return env


@pytest.mark.parametrize(
    ("label", "category"),
    [
        ("ANAT-DP", "ANAT-DP"),
        ("OBS-DP", "OBS-DP"),
        ("OBS-U", "OBS-U"),
        ("OBS-DA", "OBS-DA"),
        ("Observation::definitely present", "OBS-DP"),
        ("Observation::uncertain", "OBS-U"),
        ("Observation::definitely absent", "OBS-DA"),
        ("Anatomy::definitely present", "ANAT-DP"),
        ("  observation::Definitely  Absent ", "OBS-DA"),
        ("OBS-XYZ", None),
    ],
)
def test_label_categories(label, category):
    assert category_of_label(label) == category


@pytest.mark.parametrize(
    ("observation", "anatomy", "query"),
    [
        ("effusions", [], "pleural effusion"),
        ("effusion", ["pleural"], "pleural effusion"),
        ("effusion", ["pericardial"], None),
        ("thickening", ["pleural"], "pleural thicken"),
        ("thickened", ["pleura"], "pleural thicken"),
        ("enlarged", ["cardiomediastinal silhouette"], "enlarged cardiomediastinum"),
        ("enlarged", ["heart"], "cardiomegaly"),
        ("opacities", [], "opacity"),
        ("hyperinflated", [], "hyperinflate"),
        ("hyperinflation", [], "hyperinflate"),
        ("blunting", ["costophrenic angle"], "blunt"),
        ("scarring", [], "scar"),
        ("markings", [], "marking"),
        ("masses", [], "mass"),
        ("pneumothoraces", [], "pneumothorax"),
        ("atelectatic", [], "atelectasis"),
        ("tubes", [], "tube"),
        ("collapsed", [], "collapse"),
        ("dilated", [], "dilation"),
        ("infiltrates", [], "infiltration"),
        ("clear", ["lungs"], None),
        ("normal", ["heart"], None),
    ],
)
def test_query_normalization(observation, anatomy, query):
    assert QueryMatcher(KAD_QUERIES).match(observation, anatomy) == query


def test_report_id_of_key():
    assert report_id_of_key("p10/p10000032/s50414267.txt") == "s50414267"
    assert report_id_of_key("files/p10/p10000032/s50414267.txt") == "s50414267"
    assert report_id_of_key("CXR12") == "CXR12"


def test_align_tokens_skips_missing():
    text = "No  pneumothorax.\nMild"
    assert align_tokens(["No", "pneumothorax", ".", "xyz", "Mild"], text) == [
        (0, 2),
        (4, 16),
        (16, 17),
        (-1, -1),
        (18, 22),
    ]


def test_convert_fixture_entities(converted, reports):
    entities = converted.entities
    assert dict(entities.schema) == ENTITY_SCHEMA

    r1 = entities.filter(pl.col("report_id") == "r1").sort("char_start")
    text = reports.filter(pl.col("report_id") == "r1")["text"][0]
    assert r1["entity"].to_list() == [
        "Small", "left", "pleural", "effusions", "pneumothorax", "Mild", "cardiomegaly", "atelectasis",
    ]
    # Offsets worked out by hand on the reports text, not RadGraph's tokenized text.
    assert r1["char_start"].to_list() == [0, 6, 11, 19, 33, 47, 52, 75]
    assert r1["char_end"].to_list() == [5, 10, 18, 28, 45, 51, 64, 86]
    for start, end, surface in r1.select("char_start", "char_end", "entity").iter_rows():
        assert text[start:end] == surface
    assert r1["sentence_index"].to_list() == [0, 0, 0, 0, 1, 2, 2, 2]

    by_entity = {row["entity"]: row for row in r1.iter_rows(named=True)}
    assert by_entity["effusions"]["query"] == "pleural effusion"
    assert by_entity["effusions"]["category"] == "OBS-DP"
    assert by_entity["pneumothorax"]["query"] == "pneumothorax"
    assert by_entity["pneumothorax"]["category"] == "OBS-DA"
    assert by_entity["atelectasis"]["category"] == "OBS-U"
    assert by_entity["pleural"]["query"] is None
    assert by_entity["Small"]["query"] is None
    assert set(entities["extractor"].to_list()) == {"radgraph"}


def test_convert_radgraph_xl_labels(converted):
    r2 = {row["entity"]: row for row in converted.entities.filter(pl.col("report_id") == "r2").iter_rows(named=True)}
    assert r2["enlarged"]["query"] == "cardiomegaly"
    assert r2["enlarged"]["category"] == "OBS-DP"
    assert r2["heart"]["category"] == "ANAT-DP"
    assert r2["effusion"]["query"] is None
    assert r2["clear"]["query"] is None


def test_convert_rejects_with_reasons(converted):
    rejects = converted.rejects.filter(pl.col("report_id") == "r3").sort("entity_id")
    assert rejects.select("entity_id", "reason").rows() == [
        ("1", "unknown-label"),
        ("2", "invalid-token-span"),
        ("3", "dangling-relation"),
    ]
    r3 = converted.entities.filter(pl.col("report_id") == "r3")
    assert r3["entity"].to_list() == ["right"]


def test_convert_unknown_report_id(reports):
    data = load_radgraph_json(FIXTURES / "radgraph_sample.json")
    result = convert_radgraph(data, KAD_QUERIES, reports.filter(pl.col("report_id") != "r2"))
    assert "r2" not in result.entities["report_id"].to_list()
    unknown = result.rejects.filter(pl.col("reason") == "unknown-report-id")
    assert unknown["report_id"].to_list() == ["r2"]


def test_convert_without_reports_uses_radgraph_text():
    entities = entities_from_radgraph_json(FIXTURES / "radgraph_sample.json", KAD_QUERIES)
    effusions = entities.filter(pl.col("entity") == "effusions")
    radgraph_text = "Small left pleural effusions . No pneumothorax . Mild cardiomegaly , possibly atelectasis ."
    assert effusions["char_start"][0] == radgraph_text.index("effusions")


def test_load_rejects_non_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(RadGraphFormatError, match="keyed by report id"):
        load_radgraph_json(path)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(RadGraphFormatError, match="not valid UTF-8 JSON"):
        load_radgraph_json(broken)
    with pytest.raises(FileNotFoundError):
        load_radgraph_json(tmp_path / "absent.json")


def test_environment_missing_executable(tmp_path):
    with pytest.raises(RadGraphUnavailableError, match="pip install radgraph 'transformers<5'"):
        check_radgraph_environment(str(tmp_path / "no-python"))


def test_environment_without_radgraph():
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    with pytest.raises(RadGraphUnavailableError, match="cannot import radgraph") as raised:
        check_radgraph_environment(sys.executable, env=env)
    assert "python -m venv" in str(raised.value)


def test_environment_with_fake_radgraph():
    versions = check_radgraph_environment(sys.executable, env=fake_env_vars())
    assert versions == {"radgraph": "0.0-test", "transformers": "4.49.0"}


def test_runner_failure_codes():
    with pytest.raises(RadGraphUnavailableError, match="Hugging Face"):
        raise_for_runner_failure(4, "RadGraph model could not be loaded\n")
    with pytest.raises(RuntimeError, match="exited with code 1"):
        raise_for_runner_failure(1, "Traceback\nValueError: boom")


def test_run_radgraph_direct(tmp_path):
    reports = pl.DataFrame(
        {"report_id": ["a", "b", "c"], "text": ["Small pleural effusions.", "No pneumothorax.", "   "]}
    )
    result = run_radgraph(reports, sys.executable, model_type="radgraph-xl", work_dir=tmp_path, env=fake_env_vars())
    rows = result.entities.filter(pl.col("query").is_not_null()).select("report_id", "query", "category").rows()
    assert sorted(rows) == [("a", "pleural effusion", "OBS-DP"), ("b", "pneumothorax", "OBS-DA")]
    assert result.rejects.height == 0


def test_run_radgraph_missing_weights(tmp_path):
    reports = pl.DataFrame({"report_id": ["a"], "text": ["No pneumothorax."]})
    with pytest.raises(RadGraphUnavailableError, match="Hugging Face Hub"):
        run_radgraph(reports, sys.executable, model_type="missing-weights", work_dir=tmp_path, env=fake_env_vars())


def test_pipes_round_trip(tmp_path):
    reports = pl.DataFrame(
        {"report_id": [f"r{i}" for i in range(5)], "text": ["No pleural effusion."] * 4 + ["Cardiomegaly."]}
    )
    input_path = write_runner_input(reports, tmp_path / "in.jsonl")
    output_path = tmp_path / "out.json"
    captured: dict = {}

    @dg.asset
    def radgraph_probe(context: dg.AssetExecutionContext, pipes_subprocess_client: dg.PipesSubprocessClient):
        invocation = pipes_subprocess_client.run(
            command=runner_command(sys.executable),
            context=context,
            extras={
                "input_path": str(input_path),
                "output_path": str(output_path),
                "model_type": "radgraph-xl",
                "batch_size": 2,
            },
            env={"PYTHONPATH": str(FAKE_ENV)},
        )
        captured["messages"] = invocation.get_custom_messages()
        return dg.Output(len(captured["messages"]))

    result = dg.materialize(
        [radgraph_probe], resources={"pipes_subprocess_client": dg.PipesSubprocessClient()}
    )
    assert result.success

    progress = [message["reports_done"] for message in captured["messages"]]
    # Batches of 2 over 5 reports, then the final count message.
    assert progress == [2, 4, 5, 5]
    assert captured["messages"][-1]["entities"] == 4 * 2 + 1

    entities = entities_from_radgraph_json(output_path, KAD_QUERIES, reports)
    labelled = entities.filter(pl.col("query").is_not_null()).select("report_id", "query", "category").sort("report_id")
    assert labelled.rows() == [
        ("r0", "pleural effusion", "OBS-DA"),
        ("r1", "pleural effusion", "OBS-DA"),
        ("r2", "pleural effusion", "OBS-DA"),
        ("r3", "pleural effusion", "OBS-DA"),
        ("r4", "cardiomegaly", "OBS-DP"),
    ]


def _radgraph_asset_run(tmp_path, radgraph_resource):
    from assets import extraction_models
    from assets.partitions import partition_output, report_buckets, single_run, split_by_bucket
    from resources.io_manager import ParquetIOManager

    texts = {"CXR1": "Small pleural effusions.", "CXR2": "No pneumothorax."}

    @dg.asset(partitions_def=report_buckets, backfill_policy=single_run)
    def reports(context):
        table = pl.DataFrame({"report_id": list(texts), "text": list(texts.values())})
        return partition_output(context, split_by_bucket(table, context.partition_keys))

    defs = dg.Definitions(
        assets=[reports, extraction_models.report_entities_radgraph],
        resources={
            "io_manager": ParquetIOManager(base_uri=str(tmp_path / "artifacts")),
            "radgraph": radgraph_resource,
            "pipes_subprocess_client": dg.PipesSubprocessClient(),
        },
    )
    keys = report_buckets.get_partition_keys()
    return defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=dg.DagsterInstance.ephemeral(),
        tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]},
        raise_on_error=False,
    )


def test_radgraph_asset_runs_model_through_pipes(tmp_path, monkeypatch):
    from resources.radgraph import RadGraphResource

    monkeypatch.setenv("PYTHONPATH", str(FAKE_ENV))
    result = _radgraph_asset_run(tmp_path, RadGraphResource(python_executable=sys.executable, batch_size=1))
    assert result.success
    output = result.output_for_node("report_entities_radgraph")
    entities = pl.concat(list(output.values())) if isinstance(output, dict) else output
    rows = entities.filter(pl.col("query").is_not_null()).select("report_id", "query", "category").sort("report_id")
    assert rows.rows() == [("CXR1", "pleural effusion", "OBS-DP"), ("CXR2", "pneumothorax", "OBS-DA")]
    metadata = result.asset_materializations_for_node("report_entities_radgraph")[0].metadata
    assert metadata["reports_annotated"].value == 2


def test_radgraph_asset_missing_environment(tmp_path, monkeypatch):
    from resources.radgraph import RadGraphResource

    monkeypatch.delenv("PYTHONPATH", raising=False)
    result = _radgraph_asset_run(tmp_path, RadGraphResource(python_executable=sys.executable))
    assert not result.success
    error = result.get_step_failure_events()[0].event_specific_data.error
    assert error.cause.cls_name == "RadGraphUnavailableError"
    assert "pip install radgraph 'transformers<5'" in error.cause.message
