"""The ``kad evaluate`` command on CSV and Parquet tables."""

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, roc_auc_score

from kad_pipeline.evaluation.cli import add_evaluate_arguments, run_evaluate

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPECTED_COLUMNS = ["query", "n", "positives", "auc", "auc_low", "auc_high", "threshold", "mcc", "mcc_low",
                    "mcc_high", "f1", "f1_low", "f1_high", "acc", "acc_low", "acc_high"]
QUERIES = ["pleural effusion", "cardiomegaly", "edema"]


def _tables(rng, n, prefix):
    ids = [f"{prefix}{i:03d}" for i in range(n)]
    labels = {q: rng.integers(0, 2, n) for q in QUERIES}
    scores = {q: np.round(0.4 * labels[q] + 0.6 * rng.random(n), 3) for q in QUERIES}
    return (pl.DataFrame({"image_id": ids, **scores}), pl.DataFrame({"image_id": ids, **labels}))


@pytest.fixture
def tables(tmp_path):
    rng = np.random.default_rng(0)
    test_scores, test_labels = _tables(rng, 120, "t")
    val_scores, val_labels = _tables(rng, 80, "v")
    test_scores.write_csv(tmp_path / "scores.csv")
    test_labels.write_csv(tmp_path / "labels.csv")
    val_scores.write_parquet(tmp_path / "val_scores.parquet")
    val_labels.write_parquet(tmp_path / "val_labels.parquet")
    return tmp_path, test_scores, test_labels, val_scores, val_labels


def _run(argv):
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    return run_evaluate(parser.parse_args(argv))


def test_evaluate_writes_expected_table(tables):
    folder, test_scores, test_labels, val_scores, val_labels = tables
    output = folder / "out" / "metrics.csv"
    status = _run(["--scores", str(folder / "scores.csv"), "--labels", str(folder / "labels.csv"),
                   "--val-scores", str(folder / "val_scores.parquet"),
                   "--val-labels", str(folder / "val_labels.parquet"),
                   "--output", str(output), "--bootstrap", "200", "--alpha", "0.1", "--seed", "3"])
    assert status == 0

    table = pl.read_csv(output)
    assert table.columns[:16] == EXPECTED_COLUMNS
    assert table.get_column("query").to_list() == QUERIES + ["macro"]
    for query in QUERIES:
        row = table.filter(pl.col("query") == query).row(0, named=True)
        y = test_labels.get_column(query).to_numpy()
        s = test_scores.get_column(query).to_numpy()
        predicted = s >= row["threshold"]
        assert row["n"] == 120
        assert row["positives"] == int(y.sum())
        assert row["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
        assert row["mcc"] == pytest.approx(matthews_corrcoef(y, predicted), abs=1e-6)
        assert row["f1"] == pytest.approx(f1_score(y, predicted), abs=1e-6)
        assert row["acc"] == pytest.approx(accuracy_score(y, predicted), abs=1e-6)
        assert row["threshold"] in set(val_scores.get_column(query).to_list())
        for name in ("auc", "mcc", "f1", "acc"):
            assert row[f"{name}_low"] <= row[name] + 0.05
            assert row[f"{name}_low"] < row[f"{name}_high"]
    macro = table.filter(pl.col("query") == "macro").row(0, named=True)
    assert macro["auc"] == pytest.approx(table.head(3).get_column("auc").mean(), abs=1e-6)


def test_evaluate_same_seed_same_intervals(tables):
    folder = tables[0]
    outputs = []
    for name in ("a.csv", "b.csv"):
        _run(["--scores", str(folder / "scores.csv"), "--labels", str(folder / "labels.csv"),
              "--fixed-threshold", "0.5", "--output", str(folder / name), "--bootstrap", "50", "--seed", "9"])
        outputs.append(pl.read_csv(folder / name))
    assert outputs[0].equals(outputs[1])


def test_evaluate_without_threshold_source_fails(tables, caplog):
    folder = tables[0]
    status = _run(["--scores", str(folder / "scores.csv"), "--labels", str(folder / "labels.csv"),
                   "--output", str(folder / "m.csv")])
    assert status == 2
    assert "no way to choose thresholds" in caplog.text
    assert not (folder / "m.csv").exists()


def test_evaluate_missing_file_fails(tables, caplog):
    folder = tables[0]
    status = _run(["--scores", str(folder / "nope.csv"), "--labels", str(folder / "labels.csv"),
                   "--optimistic-test-thresholds", "--output", str(folder / "m.csv")])
    assert status == 2
    assert "nope.csv" in caplog.text


def test_kad_evaluate_subprocess(tables):
    folder = tables[0]
    try:
        from kad_pipeline.cli import build_parser

        build_parser()
    except ImportError as error:
        pytest.skip(f"the kad command line cannot be built yet: {error}")
    output = folder / "metrics.parquet"
    completed = subprocess.run(
        [sys.executable, "-m", "kad_pipeline.cli", "evaluate", "--scores", str(folder / "scores.csv"),
         "--labels", str(folder / "labels.csv"), "--optimistic-test-thresholds", "--bootstrap", "100",
         "--output", str(output)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    table = pl.read_parquet(output)
    assert table.columns[:16] == EXPECTED_COLUMNS
    assert table.height == 4
    assert set(table.get_column("threshold_source")) == {"test (optimistic)"}
