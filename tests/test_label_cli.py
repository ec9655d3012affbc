"""``kad label``: CSV and entity output, options, dispatch to the llm and radgraph extractors."""

import argparse
import sys
import types
from pathlib import Path

import polars as pl
import pytest

from kad_pipeline.extraction.cli import add_label_arguments, parse_queries, run_label
from kad_pipeline.extraction.rules import ENTITY_SCHEMA
from kad_pipeline.queries import KAD_QUERIES

FIXTURES = Path(__file__).parent / "fixtures" / "reports"


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kad label")
    add_label_arguments(parser)
    return run_label(parser.parse_args(argv))


@pytest.fixture
def reports_csv(tmp_path) -> Path:
    path = tmp_path / "reports.csv"
    pl.DataFrame({
        "report_id": ["R1", "R2", "R3", "R4", "R5"],
        "text": [
            "FINDINGS: No pneumothorax, but a small left pleural effusion.",
            "FINDINGS: Pneumonia cannot be excluded.",
            "IMPRESSION: Normal chest.",
            "Lungs are clear.",
            "   ",
        ],
    }).write_csv(path)
    return path


def test_label_csv_values_and_order(tmp_path, reports_csv):
    output = tmp_path / "out" / "labels.csv"
    rc = run(["--reports", str(reports_csv), "--output", str(output),
              "--queries", "pleural effusion,pneumothorax,pneumonia,normal", "--batch-size", "2"])

    assert rc == 0
    labels = pl.read_csv(output, schema_overrides={"normal": pl.Int8})
    assert labels.columns == ["report_id", "pleural effusion", "pneumothorax", "pneumonia", "normal"]
    assert labels.rows() == [
        ("R1", 1, 0, None, 0),
        ("R2", None, None, -1, -1),
        ("R3", None, None, None, 1),
        ("R4", None, None, None, None),
    ]
    assert (output.stat().st_mode & 0o777) != 0o600
    assert not list(output.parent.glob(".*.tmp"))


def test_label_default_queries_and_paper_mode(tmp_path, reports_csv):
    output = tmp_path / "labels.csv"
    assert run(["--reports", str(reports_csv), "--output", str(output), "--mode", "paper"]) == 0
    labels = pl.read_csv(output)
    assert labels.columns == ["report_id", *KAD_QUERIES]
    assert labels.filter(pl.col("report_id") == "R1")["pleural effusion"].item() == 0
    assert labels.filter(pl.col("report_id") == "R2")["pneumonia"].item() == 1


def test_label_entities_and_invalid_outputs(tmp_path, reports_csv):
    output, entities, invalid = tmp_path / "labels.csv", tmp_path / "entities.parquet", tmp_path / "invalid.csv"
    assert run(["--reports", str(reports_csv), "--output", str(output), "--entities", str(entities),
                "--invalid", str(invalid), "--batch-size", "2"]) == 0

    table = pl.read_parquet(entities)
    assert table.schema == pl.Schema(ENTITY_SCHEMA)
    assert table.filter(pl.col("report_id") == "R1")["query"].to_list() == ["pneumothorax", "pleural effusion"]
    rejected = pl.read_csv(invalid)
    assert rejected.select("report_id", "reason").rows() == [("R5", "whitespace-only")]


def test_label_workers_keep_order_and_values(tmp_path):
    reports = tmp_path / "many.csv"
    sentences = ["No pneumothorax.", "Small left pleural effusion.", "Pneumonia cannot be excluded.", "Normal chest."]
    ids = [f"R{i:03d}" for i in range(60)]
    pl.DataFrame({"report_id": ids, "text": [sentences[i % 4] for i in range(60)]}).write_csv(reports)
    single, pooled = tmp_path / "single.csv", tmp_path / "pooled.csv"
    entities = tmp_path / "entities.parquet"
    base = ["--reports", str(reports), "--queries", "pneumothorax,pleural effusion,pneumonia,normal", "--batch-size", "7"]

    assert run([*base, "--output", str(single)]) == 0
    assert run([*base, "--output", str(pooled), "--workers", "2", "--entities", str(entities)]) == 0

    labels = pl.read_csv(pooled)
    assert labels["report_id"].to_list() == ids
    assert labels.equals(pl.read_csv(single))
    assert labels.row(1) == ("R001", None, 1, None, 0)
    assert labels.row(2) == ("R002", None, None, -1, -1)
    assert pl.read_parquet(entities)["report_id"].unique(maintain_order=True).to_list() == ids


def test_label_worker_build_error_returns_2(tmp_path, reports_csv, caplog):
    bad_obo = tmp_path / "bad.obo"
    bad_obo.write_text("format-version: 1.2\n")
    output = tmp_path / "labels.csv"
    rc = run(["--reports", str(reports_csv), "--output", str(output), "--workers", "2", "--obo", str(bad_obo)])
    assert rc == 2
    assert "could not be built" in caplog.text
    assert "no [Term] stanzas" in caplog.text
    assert not output.exists()


def test_label_reads_openi_folder(tmp_path):
    output = tmp_path / "labels.csv"
    assert run(["--reports", str(FIXTURES / "openi"), "--output", str(output), "--queries", "pleural effusion,pneumothorax"]) == 0
    labels = pl.read_csv(output)
    assert labels.rows() == [("CXR101", 1, 0), ("CXR102", None, None)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--queries", " , "], "--queries is empty"),
        (["--queries", "edema,edema"], "repeats"),
        (["--batch-size", "0"], "--batch-size"),
        (["--umls-mrconso", "MRCONSO.RRF"], "must be given together"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--workers", "2", "--extractor", "llm"], "rules extractor only"),
        (["--obo", "missing.obo"], "not found"),
    ],
)
def test_label_invalid_options_return_2(tmp_path, reports_csv, caplog, argv, message):
    rc = run(["--reports", str(reports_csv), "--output", str(tmp_path / "labels.csv"), *argv])
    assert rc == 2
    assert message in caplog.text
    assert not (tmp_path / "labels.csv").exists()


def test_label_missing_reports_return_2(tmp_path, caplog):
    assert run(["--output", str(tmp_path / "labels.csv")]) == 2
    assert "--reports is required" in caplog.text
    assert run(["--reports", str(tmp_path / "none.csv"), "--output", str(tmp_path / "labels.csv")]) == 2
    assert "not found" in caplog.text


def test_parse_queries_default():
    assert parse_queries(None) == list(KAD_QUERIES)
    assert parse_queries(" edema , pleural effusion ") == ["edema", "pleural effusion"]


def fake_entities(rows):
    base = {"sentence_index": 0, "char_start": 0, "char_end": 1, "entity": "x", "cui": None, "semantic_type": None}
    return pl.DataFrame([{**base, **row} for row in rows], schema=ENTITY_SCHEMA)


def test_llm_dispatch_uses_provided_function(tmp_path, reports_csv, monkeypatch):
    calls = []

    def extract_with_llm_from_args(reports, args):
        calls.append((reports["report_id"].to_list(), args.model, args.api_key_env, args.concurrency))
        return fake_entities([
            {"report_id": rid, "query": "edema", "category": "OBS-U", "extractor": "llm", "extractor_version": "v"}
            for rid in reports["report_id"].to_list()
        ])

    module = types.ModuleType("kad_pipeline.extraction.llm")
    module.extract_with_llm_from_args = extract_with_llm_from_args
    monkeypatch.setitem(sys.modules, "kad_pipeline.extraction.llm", module)

    output = tmp_path / "labels.csv"
    rc = run(["--extractor", "llm", "--reports", str(reports_csv), "--output", str(output), "--queries", "edema",
              "--model", "tiny", "--base-url", "http://127.0.0.1:9", "--batch-size", "3"])
    assert rc == 0
    assert calls == [(["R1", "R2", "R3"], "tiny", "OPENAI_API_KEY", 4), (["R4"], "tiny", "OPENAI_API_KEY", 4)]
    assert pl.read_csv(output).rows() == [("R1", -1), ("R2", -1), ("R3", -1), ("R4", -1)]


def test_radgraph_dispatch_uses_provided_function(tmp_path, monkeypatch):
    seen = []

    def entities_from_radgraph_json(path, queries):
        seen.append((Path(path).name, list(queries)))
        return fake_entities([
            {"report_id": "S1", "query": "pneumothorax", "category": "OBS-DA", "extractor": "radgraph", "extractor_version": "v"},
            {"report_id": "S2", "query": "pneumothorax", "category": "OBS-DP", "extractor": "radgraph", "extractor_version": "v"},
        ])

    module = types.ModuleType("kad_pipeline.extraction.radgraph")
    module.entities_from_radgraph_json = entities_from_radgraph_json
    monkeypatch.setitem(sys.modules, "kad_pipeline.extraction.radgraph", module)

    radgraph_json = tmp_path / "radgraph.json"
    radgraph_json.write_text("{}")
    output = tmp_path / "labels.csv"
    assert run(["--extractor", "radgraph", "--radgraph-json", str(radgraph_json), "--output", str(output),
                "--queries", "pneumothorax,normal"]) == 0
    assert seen == [("radgraph.json", ["pneumothorax", "normal"])]
    assert pl.read_csv(output).rows() == [("S1", 0, 1), ("S2", 1, 0)]


def test_radgraph_requires_json(tmp_path, caplog):
    assert run(["--extractor", "radgraph", "--output", str(tmp_path / "labels.csv")]) == 2
    assert "--radgraph-json is required" in caplog.text


def test_kad_console_entry_point(tmp_path, reports_csv):
    from kad_pipeline.cli import main

    output = tmp_path / "labels.csv"
    assert main(["label", "--reports", str(reports_csv), "--output", str(output), "--queries", "pneumothorax"]) == 0
    assert pl.read_csv(output)["pneumothorax"].to_list()[0] == 0
