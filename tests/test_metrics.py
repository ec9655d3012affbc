"""Metrics and bootstrap intervals checked against scikit-learn and explicit resampling."""

import math

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, roc_auc_score

from kad_pipeline.evaluation import metrics as m


def _random_case(rng, n, tie_decimals=None):
    y = rng.integers(0, 2, n)
    s = rng.random(n)
    if tie_decimals is not None:
        s = np.round(s, tie_decimals)
    return y, s


@pytest.mark.parametrize("tie_decimals", [None, 1, 0])
def test_auc_matches_sklearn(tie_decimals):
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(150):
        y, s = _random_case(rng, int(rng.integers(2, 80)), tie_decimals)
        if y.min() == y.max():
            continue
        assert m.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        checked += 1
    assert checked > 100


def test_auc_rare_positives_and_rare_negatives():
    rng = np.random.default_rng(1)
    s = np.round(rng.random(500), 2)
    y = np.zeros(500, dtype=int)
    y[[3, 17, 200]] = 1  # minority class positive: positives anchor the buckets
    assert m.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m.roc_auc(1 - y, s) == pytest.approx(roc_auc_score(1 - y, s), abs=1e-12)


def test_auc_all_scores_tied_is_half():
    assert m.roc_auc([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3]) == 0.5


def test_auc_one_class_is_nan():
    assert math.isnan(m.roc_auc([1, 1, 1], [0.1, 0.5, 0.9]))
    assert math.isnan(m.roc_auc([0, 0], [0.1, 0.5]))


def test_nan_score_raises_with_query_name():
    with pytest.raises(ValueError, match="1 score.*NaN.*'edema'"):
        m.roc_auc([0, 1, 1], [0.2, np.nan, 0.4], query="edema")


def test_invalid_label_value_raises():
    with pytest.raises(ValueError, match="uncertain"):
        m.roc_auc([0, 1, -1], [0.2, 0.3, 0.4])


def test_missing_labels_are_excluded():
    y = np.array([0, 1, np.nan, 1, 0])
    s = np.array([0.1, 0.9, 0.5, 0.3, 0.4])
    keep = ~np.isnan(y)
    assert m.roc_auc(y, s) == pytest.approx(roc_auc_score(y[keep], s[keep]))


@pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")
def test_threshold_metrics_match_sklearn():
    rng = np.random.default_rng(3)
    for _ in range(100):
        y, s = _random_case(rng, int(rng.integers(2, 60)), 1)
        threshold = float(rng.choice(s))
        predicted = s >= threshold
        result = m.metrics_at_threshold(y, s, threshold)
        assert result["mcc"] == pytest.approx(matthews_corrcoef(y, predicted), abs=1e-12)
        assert result["f1"] == pytest.approx(f1_score(y, predicted, zero_division=0), abs=1e-12)
        assert result["acc"] == pytest.approx(accuracy_score(y, predicted), abs=1e-12)


def test_threshold_metrics_degenerate_predictions():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.4])
    nothing_predicted = m.metrics_at_threshold(y, s, 0.9)
    assert nothing_predicted["mcc"] == matthews_corrcoef(y, s >= 0.9) == 0.0
    assert nothing_predicted["f1"] == f1_score(y, s >= 0.9, zero_division=0) == 0.0
    assert nothing_predicted["acc"] == 0.5
    one_class = m.metrics_at_threshold([0, 0, 0], [0.1, 0.2, 0.3], 0.15)
    assert one_class["mcc"] == matthews_corrcoef([0, 0, 0], [False, True, True])
    assert one_class["f1"] == 0.0


def test_optimal_threshold_matches_brute_force():
    rng = np.random.default_rng(11)
    for _ in range(60):
        y, s = _random_case(rng, int(rng.integers(4, 50)), 1)
        if y.min() == y.max():
            continue
        threshold = m.mcc_optimal_threshold(y, s)
        best = max(matthews_corrcoef(y, s >= t) for t in np.unique(s))
        assert matthews_corrcoef(y, s >= threshold) == pytest.approx(best, abs=1e-12)
        assert threshold in set(s.tolist())


def test_optimal_threshold_hand_case():
    # Scores 0.9 and 0.8 are positive, 0.7 and 0.1 negative: >= 0.8 separates perfectly.
    assert m.mcc_optimal_threshold([1, 1, 0, 0], [0.9, 0.8, 0.7, 0.1]) == 0.8


def test_optimal_threshold_one_class_is_nan():
    assert math.isnan(m.mcc_optimal_threshold([0, 0, 0], [0.1, 0.2, 0.3]))


def test_resample_counts_shape_and_sums():
    counts = m.resample_counts(50, 30, seed=4)
    assert counts.shape == (50, 30)
    assert np.all(counts.sum(axis=0) == 50)
    assert np.array_equal(counts, m.resample_counts(50, 30, seed=4))
    assert not np.array_equal(counts, m.resample_counts(50, 30, seed=5))


def test_bootstrap_auc_equals_sklearn_per_resample():
    rng = np.random.default_rng(2)
    y, s = _random_case(rng, 40, 1)
    counts = m.resample_counts(40, 60, seed=9)
    aucs = m._bucketed_auc(y.astype(np.int8), s, counts)
    for b in range(60):
        index = np.repeat(np.arange(40), counts[:, b].astype(int))
        if y[index].min() == y[index].max():
            assert math.isnan(aucs[b])
        else:
            assert aucs[b] == pytest.approx(roc_auc_score(y[index], s[index]), abs=1e-9)


def _explicit_bootstrap(y, s, threshold, counts, alpha):
    """Percentile intervals computed by materializing each resample and calling scikit-learn."""
    values = {"auc": [], "mcc": [], "f1": [], "acc": []}
    for b in range(counts.shape[1]):
        index = np.repeat(np.arange(y.size), counts[:, b].astype(int))
        known = ~np.isnan(y[index])
        yb = y[index][known].astype(int)
        sb = s[index][known]
        if yb.min() != yb.max():
            values["auc"].append(roc_auc_score(yb, sb))
        predicted = sb >= threshold
        values["mcc"].append(matthews_corrcoef(yb, predicted))
        values["f1"].append(f1_score(yb, predicted, zero_division=0))
        values["acc"].append(accuracy_score(yb, predicted))
    return {k: np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)]) for k, v in values.items()}


def test_evaluate_arrays_intervals_match_explicit_resampling():
    rng = np.random.default_rng(5)
    n = 80
    labels = rng.integers(0, 2, (n, 2)).astype(float)
    labels[rng.random((n, 2)) < 0.1] = np.nan
    scores = np.round(np.clip(0.3 * np.nan_to_num(labels) + rng.random((n, 2)) * 0.7, 0, 1), 2)
    thresholds = np.array([0.5, 0.4])
    settings = m.BootstrapSettings(n_resamples=200, alpha=0.1, seed=3)

    table = m.evaluate_arrays(["a", "b"], scores, labels, thresholds, bootstrap=settings)
    counts = m.resample_counts(n, 200, seed=3)
    for q, query in enumerate(["a", "b"]):
        row = table.filter(pl.col("query") == query).row(0, named=True)
        known = ~np.isnan(labels[:, q])
        assert row["n"] == int(known.sum())
        assert row["positives"] == int(np.nansum(labels[:, q]))
        assert row["auc"] == pytest.approx(roc_auc_score(labels[known, q], scores[known, q]))
        predicted = scores[known, q] >= thresholds[q]
        assert row["mcc"] == pytest.approx(matthews_corrcoef(labels[known, q], predicted))
        expected = _explicit_bootstrap(labels[:, q], scores[:, q], thresholds[q], counts, 0.1)
        for name in ("auc", "mcc", "f1", "acc"):
            assert row[f"{name}_low"] == pytest.approx(expected[name][0], abs=1e-9), name
            assert row[f"{name}_high"] == pytest.approx(expected[name][1], abs=1e-9), name


def test_macro_row_is_mean_over_queries():
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 2, (60, 3)).astype(float)
    scores = rng.random((60, 3))
    table = m.evaluate_arrays(["a", "b", "c"], scores, labels, np.array([0.5, 0.5, 0.5]),
                              bootstrap=m.BootstrapSettings(n_resamples=50))
    assert table.columns == list(m.METRIC_COLUMNS)
    queries = table.filter(pl.col("query") != "macro")
    macro = table.filter(pl.col("query") == "macro").row(0, named=True)
    for name in ("auc", "mcc", "f1", "acc"):
        assert macro[name] == pytest.approx(queries.get_column(name).mean())
        assert macro[f"{name}_low"] <= macro[name] <= macro[f"{name}_high"]
    assert macro["n"] == 60
    assert macro["positives"] == int(labels.sum())


def test_macro_skips_one_class_query():
    labels = np.array([[1, 0], [0, 0], [1, 0], [0, 0]], dtype=float)
    scores = np.array([[0.9, 0.1], [0.2, 0.3], [0.8, 0.2], [0.1, 0.4]])
    table = m.evaluate_arrays(["a", "b"], scores, labels, np.array([0.5, 0.5]),
                              bootstrap=m.BootstrapSettings(n_resamples=20))
    rows = {row["query"]: row for row in table.iter_rows(named=True)}
    assert math.isnan(rows["b"]["auc"])
    assert rows["a"]["auc"] == 1.0
    assert rows["macro"]["auc"] == 1.0


def test_evaluate_tables_validation_thresholds():
    rng = np.random.default_rng(12)
    ids = [f"img{i}" for i in range(40)]
    val_labels = rng.integers(0, 2, 40)
    val_scores = np.round(0.5 * val_labels + 0.5 * rng.random(40), 2)
    test_labels = rng.integers(0, 2, 40)
    test_scores = np.round(0.5 * test_labels + 0.5 * rng.random(40), 2)
    table = m.evaluate_tables(
        pl.DataFrame({"image_id": ids, "edema": test_scores}),
        pl.DataFrame({"image_id": ids, "edema": test_labels}),
        val_scores=pl.DataFrame({"image_id": ids, "edema": val_scores}),
        val_labels=pl.DataFrame({"image_id": ids, "edema": val_labels}),
        bootstrap=m.BootstrapSettings(n_resamples=0),
    )
    row = table.row(0, named=True)
    assert row["threshold"] == m.mcc_optimal_threshold(val_labels, val_scores)
    assert row["mcc"] == pytest.approx(matthews_corrcoef(test_labels, test_scores >= row["threshold"]))
    assert row["threshold_source"] == "validation"
    assert math.isnan(row["auc_low"])


def test_evaluate_tables_optimistic_is_labelled():
    table = m.evaluate_tables(
        pl.DataFrame({"image_id": ["a", "b", "c", "d"], "q": [0.9, 0.8, 0.3, 0.1]}),
        pl.DataFrame({"image_id": ["a", "b", "c", "d"], "q": [1, 1, 0, 0]}),
        threshold_mode="optimistic-test",
        bootstrap=m.BootstrapSettings(n_resamples=10),
    )
    assert set(table.get_column("threshold_source")) == {m.OPTIMISTIC_LABEL}
    assert table.row(0, named=True)["mcc"] == 1.0


def test_evaluate_tables_missing_score_row_raises():
    with pytest.raises(ValueError, match="1 labelled test image"):
        m.evaluate_tables(
            pl.DataFrame({"image_id": ["a", "b"], "q": [0.9, 0.1]}),
            pl.DataFrame({"image_id": ["a", "b", "c"], "q": [1, 0, 1]}),
            threshold_mode="fixed", fixed_threshold=0.5,
        )


def test_evaluate_tables_without_validation_raises():
    with pytest.raises(ValueError, match="validation split"):
        m.evaluate_tables(pl.DataFrame({"image_id": ["a"], "q": [0.9]}), pl.DataFrame({"image_id": ["a"], "q": [1]}))


def test_bootstrap_settings_validation():
    with pytest.raises(ValueError, match="alpha"):
        m.BootstrapSettings(alpha=1.5)
    with pytest.raises(ValueError, match="n_resamples"):
        m.BootstrapSettings(n_resamples=-1)


def test_long_to_wide_rejects_repeats():
    long = pl.DataFrame({"image_id": ["a", "a"], "query": ["q", "q"], "probability": [0.1, 0.2]})
    with pytest.raises(ValueError, match="repeat"):
        m.long_to_wide(long, "probability")


def test_one_class_validation_gives_nan_threshold():
    ids = ["a", "b", "c", "d"]
    val_scores = pl.DataFrame({"image_id": ids, "q1": [0.9, 0.2, 0.8, 0.1], "q2": [0.5, 0.4, 0.3, 0.2]})
    val_labels = pl.DataFrame({"image_id": ids, "q1": [1, 0, 1, 0], "q2": [0, 0, 0, 0]})
    test_scores = pl.DataFrame({"image_id": ids, "q1": [0.95, 0.1, 0.85, 0.3], "q2": [0.6, 0.1, 0.7, 0.2]})
    test_labels = pl.DataFrame({"image_id": ids, "q1": [1, 0, 1, 0], "q2": [1, 0, 1, 0]})
    table = m.evaluate_tables(test_scores, test_labels, val_scores=val_scores, val_labels=val_labels,
                              bootstrap=m.BootstrapSettings(n_resamples=20))
    rows = {row["query"]: row for row in table.iter_rows(named=True)}
    assert math.isnan(rows["q2"]["threshold"])
    assert math.isnan(rows["q2"]["mcc"])
    assert math.isnan(rows["q2"]["mcc_low"])
    assert rows["q2"]["auc"] == 1.0
    assert rows["q1"]["threshold"] == 0.8
    assert rows["q1"]["mcc"] == 1.0
    assert rows["macro"]["mcc"] == 1.0
    assert rows["macro"]["auc"] == 1.0
