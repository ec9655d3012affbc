"""Agreement between extractors: Cohen's kappa checked by hand and against scikit-learn."""

import json

import polars as pl
import pytest
from sklearn.metrics import cohen_kappa_score

from kad_pipeline.extraction.agreement import agreement_table, agreement_wide, cohen_kappa, gold_label_matrix

QUERIES = ("pleural effusion", "edema", "pneumothorax")


def matrix(report_ids, **columns) -> pl.DataFrame:
    data = {"report_id": report_ids, **columns}
    return pl.DataFrame(data, schema={"report_id": pl.String(), **{name: pl.Int8() for name in columns}})


def sklearn_kappa(labels_a, labels_b) -> float:
    # scikit-learn needs comparable labels, so "not mentioned" (None) becomes 9.
    return cohen_kappa_score([9 if a is None else a for a in labels_a], [9 if b is None else b for b in labels_b])


def test_kappa_by_hand():
    # p_o = 3/4; p_e = 0.5 * 0.25 + 0.5 * 0.75 = 0.5; kappa = (0.75 - 0.5) / 0.5 = 0.5
    assert cohen_kappa([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(0.5)
    assert cohen_kappa([1, 0, -1], [1, 0, -1]) == pytest.approx(1.0)
    assert cohen_kappa([], []) is None
    # Both raters constant and equal: p_e = 1, kappa undefined.
    assert cohen_kappa([0, 0, 0], [0, 0, 0]) is None
    with pytest.raises(ValueError, match="differ in length"):
        cohen_kappa([1], [1, 0])


@pytest.mark.parametrize(
    ("labels_a", "labels_b"),
    [
        ([1, 0, -1, None, 1, 1, 0, None], [1, 0, 0, None, -1, 1, None, None]),
        ([None, None, 1, 0, 0, -1, -1, 1, 1, 1], [1, None, 1, 0, -1, -1, None, 0, 1, 1]),
        ([1, 1, 1, 0], [0, 0, 0, 1]),
    ],
)
def test_kappa_matches_sklearn(labels_a, labels_b):
    assert cohen_kappa(labels_a, labels_b) == pytest.approx(sklearn_kappa(labels_a, labels_b))


def test_agreement_table_values():
    rules = matrix(
        ["a", "b", "c", "d", "e"],
        **{"pleural effusion": [1, 0, 1, None, -1], "edema": [None, 1, 1, 0, 0], "pneumothorax": [0, 0, 0, 0, 0]},
    )
    llm = matrix(
        ["b", "a", "c", "d", "f"],
        **{"pleural effusion": [0, 1, -1, None, 1], "edema": [1, None, 0, 0, 1], "pneumothorax": [0, 0, 0, 0, 0]},
    )
    table, disagreements = agreement_table({"rules": rules, "llm": llm}, QUERIES)

    assert table["pair"].unique().to_list() == ["llm vs rules"]
    effusion = table.filter(pl.col("query") == "pleural effusion").row(0, named=True)
    # Shared reports a, b, c, d; llm labels in that order: 1, 0, -1, None.
    assert effusion["n_reports"] == 4
    assert effusion["n_agree"] == 3
    assert effusion["percent_agreement"] == pytest.approx(75.0)
    assert effusion["cohen_kappa"] == pytest.approx(sklearn_kappa([1, 0, -1, None], [1, 0, 1, None]))
    assert effusion["cohen_kappa_present"] == pytest.approx(
        cohen_kappa_score([True, False, False, False], [True, False, True, False])
    )
    assert (effusion["present_a"], effusion["present_b"]) == (1, 2)

    pneumothorax = table.filter(pl.col("query") == "pneumothorax").row(0, named=True)
    assert pneumothorax["percent_agreement"] == pytest.approx(100.0)
    assert pneumothorax["cohen_kappa"] is None

    assert disagreements.filter(pl.col("query") == "pleural effusion").select("report_id", "label_a", "label_b").rows() == [
        ("c", -1, 1)
    ]
    assert sorted(disagreements.filter(pl.col("query") == "edema")["report_id"].to_list()) == ["c"]
    assert "text" not in disagreements.columns


def test_agreement_with_gold():
    rules = matrix(["a", "b", "c"], **{"pleural effusion": [1, 0, 1], "edema": [1, 1, 0]})
    radgraph = matrix(["a", "b", "c"], **{"pleural effusion": [1, 1, 1], "edema": [1, 1, 0]})
    gold = matrix(["a", "b", "c"], **{"pleural effusion": [1, 0, 0]})
    table, _ = agreement_table({"rules": rules, "radgraph": radgraph}, QUERIES, gold=gold)

    assert table.select("pair", "query").rows() == [
        ("radgraph vs rules", "pleural effusion"),
        ("radgraph vs rules", "edema"),
        ("gold vs radgraph", "pleural effusion"),
        ("gold vs rules", "pleural effusion"),
    ]
    gold_rules = table.filter(pl.col("pair") == "gold vs rules").row(0, named=True)
    assert gold_rules["cohen_kappa"] == pytest.approx(cohen_kappa_score([1, 0, 0], [1, 0, 1]))


def test_agreement_invalid_input():
    good = matrix(["a"], edema=[1])
    with pytest.raises(ValueError, match="duplicate report ids"):
        agreement_table({"x": matrix(["a", "a"], edema=[1, 0]), "y": good}, ("edema",))
    with pytest.raises(ValueError, match="no report_id"):
        agreement_table({"x": pl.DataFrame({"edema": [1]}), "y": good}, ("edema",))
    with pytest.raises(ValueError, match="values"):
        agreement_table({"x": matrix(["a"], edema=[2]), "y": good}, ("edema",))
    with pytest.raises(ValueError, match="reserved"):
        agreement_table({"gold": good, "y": good}, ("edema",))


def test_agreement_wide_cells():
    rules = matrix(["a", "b", "c", "d"], edema=[1, 1, 0, 0], pneumothorax=[0, 0, 0, 0])
    llm = matrix(["a", "b", "c", "d"], edema=[1, 0, 0, 0], pneumothorax=[0, 0, 0, 0])
    table, _ = agreement_table({"rules": rules, "llm": llm}, ("edema", "pneumothorax"))
    wide = agreement_wide(table)
    assert wide.columns == ["query", "llm vs rules"]
    assert wide.rows() == [("edema", "0.5 (75%)"), ("pneumothorax", "n/a (100%)")]


def test_agreement_from_label_matrix():
    labels = pytest.importorskip("kad_pipeline.extraction.labels")

    def entities(rows, extractor):
        return pl.DataFrame(
            [
                {
                    "report_id": report_id,
                    "sentence_index": 0,
                    "char_start": 0,
                    "char_end": 1,
                    "entity": query,
                    "query": query,
                    "category": category,
                    "cui": None,
                    "semantic_type": None,
                    "extractor": extractor,
                    "extractor_version": "test",
                }
                for report_id, query, category in rows
            ]
        )

    report_ids = ["a", "b"]
    rules = labels.label_matrix(
        entities([("a", "edema", "OBS-DP"), ("b", "edema", "OBS-DA")], "rules"), report_ids, QUERIES
    )
    llm = labels.label_matrix(entities([("a", "edema", "OBS-DP"), ("b", "edema", "OBS-U")], "llm"), report_ids, QUERIES)
    _, disagreements = agreement_table({"rules": rules, "llm": llm}, QUERIES)
    assert disagreements.select("query", "report_id", "label_a", "label_b").rows() == [("edema", "b", -1, 0)]


def test_gold_label_matrix_columns():
    table = pl.DataFrame(
        {"filename": ["CXR1", "CXR2"], "Effusion": [1, 0], "Pleural_Thickening": [0, 1], "Fibrosis": [1, 1], "Edema": [0, 0]}
    )
    gold = gold_label_matrix(table, ("pleural effusion", "pleural thicken", "edema"))
    assert gold.columns == ["report_id", "pleural effusion", "pleural thicken", "edema"]
    assert gold.rows() == [("CXR1", 1, 0, 0), ("CXR2", 0, 1, 0)]
    assert gold.schema["edema"] == pl.Int8()
    with pytest.raises(ValueError, match="id columns"):
        gold_label_matrix(pl.DataFrame({"Edema": [1]}), ("edema",))


# --------------------------------------------------------------------------------------------
# Dagster assets, end to end with the scripted LLM server and a RadGraph JSON file
# --------------------------------------------------------------------------------------------

REPORT_TEXTS = {
    "CXR1": "Small pleural effusion. No pneumothorax.",
    "CXR2": "No pleural effusion.",
    "CXR3": "Edema.",
}


def _extraction_defs(tmp_path, llm_resource, radgraph_resource):
    import dagster as dg

    from assets import extraction_models
    from assets.partitions import partition_output, report_buckets, single_run, split_by_bucket
    from resources.io_manager import ParquetIOManager
    from resources.storage import ArtifactStorageResource

    @dg.asset(partitions_def=report_buckets, backfill_policy=single_run)
    def reports(context):
        table = pl.DataFrame({"report_id": list(REPORT_TEXTS), "text": list(REPORT_TEXTS.values())})
        return partition_output(context, split_by_bucket(table, context.partition_keys))

    @dg.asset(partitions_def=report_buckets, backfill_policy=single_run)
    def report_entities_rules(context, reports: pl.DataFrame):
        # Rules disagree with the other extractors on CXR2 only: they call the effusion uncertain.
        rows = [("CXR1", "pleural effusion", "OBS-DP"), ("CXR1", "pneumothorax", "OBS-DA"),
                ("CXR2", "pleural effusion", "OBS-U"), ("CXR3", "edema", "OBS-DP")]
        table = pl.DataFrame(
            [
                {"report_id": r, "sentence_index": 0, "char_start": 0, "char_end": 1, "entity": q, "query": q,
                 "category": c, "cui": None, "semantic_type": None, "extractor": "rules", "extractor_version": "t"}
                for r, q, c in rows
            ]
        ).with_columns(pl.col("sentence_index", "char_start", "char_end").cast(pl.Int32))
        table = table.join(reports.select("report_id"), on="report_id", how="semi")
        return partition_output(context, split_by_bucket(table, context.partition_keys))

    artifacts = str(tmp_path / "artifacts")
    return dg.Definitions(
        assets=[
            reports,
            report_entities_rules,
            extraction_models.report_entities_radgraph,
            extraction_models.report_entities_llm,
            extraction_models.extractor_agreement,
        ],
        resources={
            "io_manager": ParquetIOManager(base_uri=artifacts),
            "storage": ArtifactStorageResource(base_uri=artifacts),
            "llm": llm_resource,
            "radgraph": radgraph_resource,
            "pipes_subprocess_client": dg.PipesSubprocessClient(),
        },
    )


def _run_all(defs):
    import dagster as dg

    from assets.partitions import report_buckets

    keys = report_buckets.get_partition_keys()
    instance = dg.DagsterInstance.ephemeral()
    bucketed = defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection={dg.AssetKey(name) for name in
                         ("reports", "report_entities_rules", "report_entities_radgraph", "report_entities_llm")}
    )
    first = bucketed.execute_in_process(
        instance=instance,
        tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]},
    )
    assert first.success
    second = defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection={dg.AssetKey("extractor_agreement"), dg.AssetKey("extractor_disagreements")}
    ).execute_in_process(instance=instance)
    assert second.success
    return first, second


def _radgraph_json(path):
    # RadGraph says what the LLM server says: effusion present and pneumothorax absent in CXR1,
    # effusion absent in CXR2, edema present in CXR3.
    def entity(token, label, index, relations=()):
        return {"tokens": token, "label": label, "start_ix": index, "end_ix": index, "relations": list(relations)}

    data = {
        "CXR1": {"text": "Small pleural effusion . No pneumothorax .", "entities": {
            "1": entity("pleural", "ANAT-DP", 1), "2": entity("effusion", "OBS-DP", 2, [["located_at", "1"]]),
            "3": entity("pneumothorax", "OBS-DA", 5)}},
        "CXR2": {"text": "No pleural effusion .", "entities": {
            "1": entity("pleural", "ANAT-DP", 1), "2": entity("effusion", "OBS-DA", 2, [["located_at", "1"]])}},
        "CXR3": {"text": "Edema .", "entities": {"1": entity("Edema", "OBS-DP", 0)}},
    }
    path.write_text(json.dumps(data))
    return path


def test_assets_end_to_end(tmp_path, monkeypatch):
    from llm_server import ChatServer

    from resources.llm import LLMExtractorResource
    from resources.radgraph import RadGraphResource

    monkeypatch.setenv("KAD_TEST_LLM_KEY", "sk-test")
    with ChatServer() as server:
        defs = _extraction_defs(
            tmp_path,
            LLMExtractorResource(
                base_url=server.base_url, model="test-model", api_key_env="KAD_TEST_LLM_KEY",
                cache_dir=str(tmp_path / "llm-cache"), requests_per_minute=None,
                prompt_price_per_million=1.0, completion_price_per_million=1.0,
            ),
            RadGraphResource(radgraph_json=str(_radgraph_json(tmp_path / "radgraph.json"))),
        )
        first, second = _run_all(defs)
        assert server.state.requests == 3

    llm_metadata = first.asset_materializations_for_node("report_entities_llm")[0].metadata
    assert llm_metadata["prompt_tokens"].value == 300
    assert llm_metadata["estimated_cost_usd"].value == pytest.approx(360 / 1e6)

    agreement = second.output_for_node("extractor_agreement", "extractor_agreement")
    disagreements = second.output_for_node("extractor_agreement", "extractor_disagreements")
    pairs = set(agreement["pair"].to_list())
    assert pairs == {"llm vs radgraph", "llm vs rules", "radgraph vs rules"}
    llm_radgraph = agreement.filter(pl.col("pair") == "llm vs radgraph")
    assert llm_radgraph["percent_agreement"].to_list() == [100.0] * llm_radgraph.height
    # "normal" follows: the uncertain effusion keeps the rules from calling CXR2 normal.
    assert sorted(disagreements.select("pair", "report_id", "query").rows()) == [
        ("llm vs rules", "CXR2", "normal"),
        ("llm vs rules", "CXR2", "pleural effusion"),
        ("radgraph vs rules", "CXR2", "normal"),
        ("radgraph vs rules", "CXR2", "pleural effusion"),
    ]
    metadata = second.asset_materializations_for_node("extractor_agreement")[0].metadata
    table_md = metadata["kappa_by_query"].value
    assert "| query | llm vs radgraph | llm vs rules | radgraph vs rules |" in table_md


def test_assets_without_optional_extractors(tmp_path):
    from resources.llm import LLMExtractorResource
    from resources.radgraph import RadGraphResource

    defs = _extraction_defs(tmp_path, LLMExtractorResource(), RadGraphResource())
    first, second = _run_all(defs)
    assert first.asset_materializations_for_node("report_entities_llm") == []
    assert first.asset_materializations_for_node("report_entities_radgraph") == []
    agreement = second.output_for_node("extractor_agreement", "extractor_agreement")
    assert agreement.height == 0
