"""Per-query classification metrics with paired percentile bootstrap confidence intervals.

Metrics: ROC AUC (Mann-Whitney, ties count one half, identical to scikit-learn's
``roc_auc_score``), and Matthews correlation coefficient (MCC), F1 and accuracy at a
decision threshold. A score at or above the threshold predicts positive.

Degenerate inputs give documented results instead of errors deep inside:
- NaN or infinite scores raise ``ValueError`` naming the query and the count.
- Missing labels (NaN) exclude that image from that query only; labels other than 0 and 1
  raise ``ValueError``.
- A query whose labels hold one class only gets AUC NaN, because AUC is undefined without
  both classes (scikit-learn raises here). A threshold chosen on such a validation split is
  NaN, and so are the threshold-based metrics.
- MCC is 0 when its denominator is 0 and F1 is 0 when it has no true, predicted or missed
  positive, as scikit-learn's ``matthews_corrcoef`` and ``f1_score`` (``zero_division=0``) do.
- Bootstrap resamples that miss one class give NaN for that resample's AUC; the percentile
  interval is taken over the remaining resamples and the count is logged.

The bootstrap is vectorized: one matrix of resample counts (how often each image is drawn
in each resample) is shared by every query and metric, so the resamples are paired. AUC per
resample comes from a weighted Mann-Whitney sum over score buckets built once per query, so
no resample is sorted again.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
import scipy.sparse as sp

logger = logging.getLogger(__name__)

ThresholdMode = Literal["validation", "optimistic-test", "fixed"]

METRIC_COLUMNS: tuple[str, ...] = (
    "query", "n", "positives",
    "auc", "auc_low", "auc_high",
    "threshold",
    "mcc", "mcc_low", "mcc_high",
    "f1", "f1_low", "f1_high",
    "acc", "acc_low", "acc_high",
    "threshold_source",
)
MACRO_ROW = "macro"

# Label for the mode that picks thresholds on the test set itself, as the KAD reference
# code does. That leaks test labels into the threshold, so MCC, F1 and accuracy come out
# optimistic. Every output row made that way carries this label.
OPTIMISTIC_LABEL = "test (optimistic)"


# ---------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------

def _validated_pair(y_true, scores, query: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Return (labels as int8, scores as float64) with missing labels removed."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    name = f" for query {query!r}" if query else ""
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length{name}: {y.size} != {s.size}")

    bad_scores = ~np.isfinite(s)
    if bad_scores.any():
        raise ValueError(
            f"{int(bad_scores.sum())} score(s) are NaN or infinite{name}; "
            "fix the model output or drop those images before evaluating"
        )

    known = ~np.isnan(y)
    y = y[known]
    s = s[known]
    invalid = (y != 0) & (y != 1)
    if invalid.any():
        values = sorted(set(np.unique(y[invalid]).tolist()))[:5]
        raise ValueError(
            f"labels must be 0, 1 or missing{name}; found {values}. "
            "Map uncertain labels (-1) with the dataset reader's uncertain rule first"
        )
    return y.astype(np.int8), s


# ---------------------------------------------------------------------------
# Point estimates
# ---------------------------------------------------------------------------

def roc_auc(y_true, scores, query: str = "") -> float:
    """Compute ROC AUC as the Mann-Whitney statistic with ties counted one half.

    Returns NaN when the known labels hold one class only.
    """
    y, s = _validated_pair(y_true, scores, query)
    weights = np.ones((y.size, 1), dtype=np.float32)
    return float(_bucketed_auc(y, s, weights)[0])


def _confusion_from_predictions(y: np.ndarray, predicted: np.ndarray) -> tuple[float, float, float, float]:
    tp = float(np.sum(predicted & (y == 1)))
    fp = float(np.sum(predicted & (y == 0)))
    fn = float(np.sum(~predicted & (y == 1)))
    tn = float(np.sum(~predicted & (y == 0)))
    return tp, fp, fn, tn


def metrics_at_threshold(y_true, scores, threshold: float, query: str = "") -> dict[str, float]:
    """Compute MCC, F1 and accuracy when ``score >= threshold`` predicts positive.

    Returns NaN for all three when the threshold is NaN.
    """
    y, s = _validated_pair(y_true, scores, query)
    if np.isnan(threshold):
        return {"mcc": float("nan"), "f1": float("nan"), "acc": float("nan")}
    counts = np.array(_confusion_from_predictions(y, s >= threshold), dtype=np.float64)
    mcc, f1, acc = _metrics_from_counts(*(counts[i : i + 1] for i in range(4)))
    return {"mcc": float(mcc[0]), "f1": float(f1[0]), "acc": float(acc[0])}


def _metrics_from_counts(tp, fp, fn, tn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compute MCC, F1 and accuracy from arrays of confusion counts (any matching shape)."""
    tp, fp, fn, tn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn, tn))
    with np.errstate(divide="ignore", invalid="ignore"):
        denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        mcc = np.where(denominator > 0, (tp * tn - fp * fn) / denominator, 0.0)
        f1_denominator = 2 * tp + fp + fn
        f1 = np.where(f1_denominator > 0, 2 * tp / f1_denominator, 0.0)
        total = tp + fp + fn + tn
        acc = np.where(total > 0, (tp + tn) / total, np.nan)
    return mcc, f1, acc


def mcc_optimal_threshold(y_true, scores, query: str = "") -> float:
    """Return the threshold that maximizes MCC, searched over every distinct score.

    Each distinct score ``t`` is a candidate for ``score >= t``. On equal MCC the highest
    candidate wins. Returns NaN when the known labels hold one class only, because MCC is
    then 0 at every threshold and no choice is meaningful.
    """
    y, s = _validated_pair(y_true, scores, query)
    positives = int(y.sum())
    negatives = y.size - positives
    if positives == 0 or negatives == 0:
        logger.warning("no threshold for query %r: labels hold one class only (%d positives of %d)",
                       query, positives, y.size)
        return float("nan")

    # One pass over the scores in descending order gives the confusion counts at every
    # distinct score, so this costs one sort instead of one pass per candidate (the KAD
    # reference code scores MCC again at each candidate threshold).
    order = np.argsort(-s, kind="stable")
    sorted_scores = s[order]
    sorted_labels = y[order]
    tp_cumulative = np.cumsum(sorted_labels, dtype=np.float64)
    fp_cumulative = np.cumsum(1 - sorted_labels, dtype=np.float64)
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores) != 0), s.size - 1]

    tp = tp_cumulative[last_of_tie]
    fp = fp_cumulative[last_of_tie]
    fn = positives - tp
    tn = negatives - fp
    mcc, _, _ = _metrics_from_counts(tp, fp, fn, tn)
    best = int(np.argmax(mcc))
    return float(sorted_scores[last_of_tie[best]])


# ---------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------

def resample_counts(n: int, n_resamples: int, seed: int, chunk: int = 64) -> np.ndarray:
    """Draw bootstrap resamples of ``n`` items and return how often each item is drawn.

    Returns a float32 array of shape (n, n_resamples): column ``b`` counts the draws of each
    item in resample ``b`` (each column sums to ``n``). A resample of items drawn with
    replacement is ``np.repeat(np.arange(n), counts[:, b])`` in any order.
    """
    if n <= 0:
        raise ValueError(f"cannot resample an empty set (n={n})")
    if n_resamples <= 0:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    rng = np.random.default_rng(seed)
    counts = np.empty((n, n_resamples), dtype=np.float32)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        draws = rng.integers(0, n, size=(stop - start, n))
        offsets = np.arange(stop - start)[:, None] * n
        block = np.bincount((draws + offsets).ravel(), minlength=(stop - start) * n)
        counts[:, start:stop] = block.reshape(stop - start, n).T
    return counts


def _bucketed_auc(y: np.ndarray, s: np.ndarray, weights: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Compute weighted Mann-Whitney AUC for every weight column.

    ``weights`` has shape (N, B), and ``rows`` gives the weight row of each of the n items
    (default: row i for item i, with N == n), so a subset needs no copy of ``weights``.
    With weights that count draws, column ``b`` gives the AUC of resample ``b`` exactly,
    ties counted one half. Returns shape (B,), NaN where a column has zero total weight in
    one class.

    Method: the minority class is the anchor. Its distinct scores split the score axis into
    buckets: one bucket per anchor score (the anchor items and the other-class items tied
    with it) and one bucket for each open interval between anchor scores. Only
    per-bucket weight sums are needed, so one sparse product aggregates all resamples
    and no resample is sorted.
    """
    n_resamples = weights.shape[1]
    positives = y == 1
    anchor_is_positive = positives.sum() <= (~positives).sum()
    anchor = positives if anchor_is_positive else ~positives

    anchor_scores = np.unique(s[anchor])
    if anchor_scores.size == 0 or anchor.all():
        return np.full(n_resamples, np.nan)

    # Bucket 2m + 1 contains the scores equal to anchor_scores[m]. Bucket 2m contains the
    # scores strictly between anchor_scores[m - 1] and anchor_scores[m].
    position = np.searchsorted(anchor_scores, s, side="left")
    tied = (position < anchor_scores.size) & (anchor_scores[np.minimum(position, anchor_scores.size - 1)] == s)
    bucket = 2 * position + tied.astype(np.int64)
    n_buckets = 2 * anchor_scores.size + 1
    column = bucket * 2 + anchor.astype(np.int64)

    if rows is None:
        rows = np.arange(s.size)
    indicator = sp.csr_matrix(
        (np.ones(s.size, dtype=np.float32), (column, rows)),
        shape=(2 * n_buckets, weights.shape[0]),
    )
    sums = np.asarray(indicator @ weights, dtype=np.float64).reshape(n_buckets, 2, n_resamples)
    other = sums[:, 0, :]
    anchor_weight = sums[1::2, 1, :]

    other_before = np.cumsum(other, axis=0) - other
    if anchor_is_positive:
        # Each positive beats the negatives below it and ties half of those in its bucket.
        beaten = other_before[1::2] + 0.5 * other[1::2]
    else:
        # Each negative is beaten by the positives above it and tied by half of its bucket.
        total_other = other.sum(axis=0, keepdims=True)
        beaten = total_other - other_before[1::2] - 0.5 * other[1::2]
    numerator = np.einsum("kb,kb->b", anchor_weight, beaten)

    anchor_total = anchor_weight.sum(axis=0)
    other_total = other.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = numerator / (anchor_total * other_total)
    auc[(anchor_total == 0) | (other_total == 0)] = np.nan
    return auc


def _percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


# ---------------------------------------------------------------------------
# Whole evaluation
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class BootstrapSettings:
    """Settings of the percentile bootstrap."""

    n_resamples: int = 1000  # resamples of the test images, paired across queries and metrics
    alpha: float = 0.05  # 1 - confidence level; 0.05 gives 95% intervals
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_resamples < 0:
            raise ValueError(f"n_resamples must be >= 0 (0 disables intervals), got {self.n_resamples}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must lie strictly between 0 and 1, got {self.alpha}")


def choose_thresholds(
    queries: list[str],
    mode: ThresholdMode,
    *,
    test_scores: np.ndarray,
    test_labels: np.ndarray,
    val_scores: np.ndarray | None = None,
    val_labels: np.ndarray | None = None,
    fixed_threshold: float | None = None,
) -> np.ndarray:
    """Return one decision threshold per query.

    ``"validation"`` maximizes MCC on the validation split. ``"optimistic-test"`` maximizes
    MCC on the test split, as the KAD reference code does; its threshold-based metrics are
    optimistic. ``"fixed"`` uses ``fixed_threshold`` for every query.
    """
    if mode == "fixed":
        if fixed_threshold is None or not np.isfinite(fixed_threshold):
            raise ValueError(f"mode 'fixed' needs a finite fixed_threshold, got {fixed_threshold}")
        return np.full(len(queries), float(fixed_threshold))
    if mode == "validation":
        if val_scores is None or val_labels is None:
            raise ValueError("mode 'validation' needs validation scores and labels")
        source_scores, source_labels = val_scores, val_labels
    elif mode == "optimistic-test":
        logger.warning("thresholds are chosen on the test set itself: MCC, F1 and accuracy are optimistic")
        source_scores, source_labels = test_scores, test_labels
    else:
        raise ValueError(f"unknown threshold mode {mode!r}; use 'validation', 'optimistic-test' or 'fixed'")
    return np.array([
        mcc_optimal_threshold(source_labels[:, q], source_scores[:, q], query)
        for q, query in enumerate(queries)
    ])


def _threshold_metrics(
    scores: np.ndarray, labels: np.ndarray, thresholds: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Compute MCC, F1 and accuracy of every query under every weight column.

    Returns arrays of shape (B, Q) for weights of shape (n_images, B). Queries with a NaN
    threshold get NaN.
    """
    n_queries = scores.shape[1]
    known = ~np.isnan(labels)
    positive = known & (labels == 1)
    predicted = scores >= thresholds[None, :]

    # Weighted confusion counts of all queries and resamples come from one matrix product.
    # Queries without missing labels need no "known" column: their total is the resample size.
    incomplete = np.flatnonzero(~known.all(axis=0))
    indicators = np.concatenate(
        [positive & predicted, (known & ~positive) & predicted, positive & ~predicted, known[:, incomplete]],
        axis=1,
    ).astype(np.float32)
    counts = (weights.T @ indicators).astype(np.float64)
    tp, fp, fn = (counts[:, i * n_queries:(i + 1) * n_queries] for i in range(3))
    total = np.broadcast_to(weights.sum(axis=0, dtype=np.float64)[:, None], tp.shape).copy()
    total[:, incomplete] = counts[:, 3 * n_queries:]

    mcc, f1, acc = _metrics_from_counts(tp, fp, fn, total - tp - fp - fn)
    no_threshold = np.broadcast_to(np.isnan(thresholds)[None, :], mcc.shape)
    for array in (mcc, f1, acc):
        array[no_threshold] = np.nan
    return {"mcc": mcc, "f1": f1, "acc": acc}


def _auc_metrics(
    queries: list[str], scores: np.ndarray, labels: np.ndarray, weights: np.ndarray, log_resamples: bool
) -> np.ndarray:
    """Compute the AUC of every query under every weight column, shape (B, Q)."""
    aucs = np.full((weights.shape[1], len(queries)), np.nan)
    for q, query in enumerate(queries):
        known_rows = np.flatnonzero(~np.isnan(labels[:, q]))
        y = labels[known_rows, q].astype(np.int8)
        if y.size == 0 or y.min() == y.max():
            if not log_resamples:
                logger.warning("AUC undefined for query %r: %d known labels, %d positive",
                               query, y.size, int(y.sum()))
            continue
        aucs[:, q] = _bucketed_auc(y, scores[known_rows, q], weights, known_rows)
        one_class = int(np.isnan(aucs[:, q]).sum())
        if log_resamples and one_class:
            logger.info("query %r: %d of %d resamples drew one class only; its AUC interval uses the rest",
                        query, one_class, weights.shape[1])
    return aucs


def evaluate_arrays(
    queries: list[str],
    scores: np.ndarray,
    labels: np.ndarray,
    thresholds: np.ndarray,
    *,
    bootstrap: BootstrapSettings = BootstrapSettings(),
    threshold_source: str = "validation",
) -> pl.DataFrame:
    """Compute the per-query metric table with bootstrap intervals, plus a macro row.

    ``scores`` and ``labels`` have shape (n_images, n_queries). Labels are 0, 1 or NaN
    (missing, excluded for that query only). Thresholds stay fixed across resamples. The
    macro row averages each metric over the queries where it is defined, and its interval
    comes from the macro mean of each paired resample. Its ``n`` counts images with at
    least one known label and ``positives`` sums the per-query positives.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    n_images, n_queries = scores.shape
    if labels.shape != scores.shape:
        raise ValueError(f"scores have shape {scores.shape} but labels have shape {labels.shape}")
    if len(queries) != n_queries or len(thresholds) != n_queries:
        raise ValueError(f"{n_queries} score columns, {len(queries)} queries, {len(thresholds)} thresholds")
    if n_images == 0:
        raise ValueError("no images to evaluate")
    for q, query in enumerate(queries):
        _validated_pair(labels[:, q], scores[:, q], query)

    n_resamples = bootstrap.n_resamples
    logger.info("evaluating %d queries on %d images with %d bootstrap resamples", n_queries, n_images, n_resamples)
    point_weights = np.ones((n_images, 1), dtype=np.float32)
    if n_resamples > 0:
        resample_weights = resample_counts(n_images, n_resamples, bootstrap.seed)
    else:
        resample_weights = np.zeros((n_images, 0), dtype=np.float32)

    points = _threshold_metrics(scores, labels, thresholds, point_weights)
    points["auc"] = _auc_metrics(queries, scores, labels, point_weights, log_resamples=False)
    resamples = _threshold_metrics(scores, labels, thresholds, resample_weights)
    resamples["auc"] = _auc_metrics(queries, scores, labels, resample_weights, log_resamples=True)

    known = ~np.isnan(labels)
    positive = known & (labels == 1)
    table_rows: list[dict] = []
    for q, query in enumerate(queries):
        row = {"query": query, "n": int(known[:, q].sum()), "positives": int(positive[:, q].sum()),
               "threshold": float(thresholds[q]), "threshold_source": threshold_source}
        for name in ("auc", "mcc", "f1", "acc"):
            row[name] = float(points[name][0, q])
            row[f"{name}_low"], row[f"{name}_high"] = _percentile_interval(resamples[name][:, q], bootstrap.alpha)
        table_rows.append(row)

    # NOTE: a resample in which some query drew one class only averages its macro AUC over
    # the remaining queries, so the macro interval mixes slightly different query sets.
    macro = {"query": MACRO_ROW, "n": int(known.any(axis=1).sum()), "positives": int(positive.sum()),
             "threshold": float("nan"), "threshold_source": threshold_source}
    with warnings.catch_warnings():
        # All-NaN rows are expected when a metric is undefined for every query.
        warnings.filterwarnings("ignore", message="Mean of empty slice", category=RuntimeWarning)
        for name in ("auc", "mcc", "f1", "acc"):
            macro[name] = float(np.nanmean(points[name][0]))
            per_resample = np.nanmean(resamples[name], axis=1) if n_resamples else np.empty(0)
            macro[f"{name}_low"], macro[f"{name}_high"] = _percentile_interval(per_resample, bootstrap.alpha)
    table_rows.append(macro)

    return pl.DataFrame(table_rows, schema=_metric_schema()).select(METRIC_COLUMNS)


def _metric_schema() -> dict[str, pl.DataType]:
    schema: dict[str, pl.DataType] = {}
    for column in METRIC_COLUMNS:
        if column in ("query", "threshold_source"):
            schema[column] = pl.String
        elif column in ("n", "positives"):
            schema[column] = pl.Int64
        else:
            schema[column] = pl.Float64
    return schema


# ---------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------

def align_wide_tables(
    scores: pl.DataFrame,
    labels: pl.DataFrame,
    id_column: str,
    queries: list[str] | None = None,
    what: str = "test",
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Align wide score and label tables on ``id_column``.

    Returns (queries, scores, labels) as arrays of shape (n_images, n_queries), in the
    order of the label table. Raises ``ValueError`` when a labelled image has no score
    row, when ids repeat, or when a requested query lacks a column. Scored images without
    labels are ignored and counted in the log.
    """
    for name, frame in (("scores", scores), ("labels", labels)):
        if id_column not in frame.columns:
            raise ValueError(f"{what} {name} table has no id column {id_column!r}; columns: {frame.columns[:10]}")
        duplicated = frame.height - frame.get_column(id_column).n_unique()
        if duplicated:
            raise ValueError(f"{what} {name} table repeats {duplicated} id(s) in column {id_column!r}")

    if queries is None:
        queries = [c for c in labels.columns if c != id_column]
    missing_scores = [q for q in queries if q not in scores.columns]
    missing_labels = [q for q in queries if q not in labels.columns]
    if missing_scores or missing_labels:
        raise ValueError(
            f"{what} queries without a score column: {missing_scores}; without a label column: {missing_labels}"
        )
    if not queries:
        raise ValueError(f"{what} label table has no query columns besides {id_column!r}")

    label_ids = labels.select(pl.col(id_column).cast(pl.String))
    score_frame = scores.select(pl.col(id_column).cast(pl.String), *[pl.col(q).cast(pl.Float64) for q in queries])
    joined = label_ids.join(score_frame, on=id_column, how="left", maintain_order="left")
    unscored = joined.filter(pl.any_horizontal(pl.col(q).is_null() for q in queries))
    if unscored.height:
        examples = unscored.get_column(id_column).head(5).to_list()
        raise ValueError(
            f"{unscored.height} labelled {what} image(s) have no score for some query, e.g. {examples}; "
            "score every labelled image or drop it from the label table"
        )
    extra = scores.height - labels.height
    if extra > 0:
        logger.info("%d scored %s image(s) have no label row and are not evaluated", extra, what)

    score_array = joined.select(queries).to_numpy().astype(np.float64)
    label_array = labels.select([pl.col(q).cast(pl.Float64) for q in queries]).to_numpy().astype(np.float64)
    return list(queries), score_array, label_array


def evaluate_tables(
    test_scores: pl.DataFrame,
    test_labels: pl.DataFrame,
    *,
    id_column: str = "image_id",
    queries: list[str] | None = None,
    val_scores: pl.DataFrame | None = None,
    val_labels: pl.DataFrame | None = None,
    threshold_mode: ThresholdMode = "validation",
    fixed_threshold: float | None = None,
    bootstrap: BootstrapSettings = BootstrapSettings(),
) -> pl.DataFrame:
    """Evaluate wide score and label tables (an id column plus one column per query).

    Label values: 1 positive, 0 negative, null or NaN missing. Returns the table described
    in ``evaluate_arrays``, with ``threshold_source`` naming where thresholds came from.
    """
    queries, scores, labels = align_wide_tables(test_scores, test_labels, id_column, queries, "test")
    val_score_array = val_label_array = None
    if threshold_mode == "validation":
        if val_scores is None or val_labels is None:
            raise ValueError(
                "thresholds need a validation split: pass validation scores and labels, "
                "or choose threshold_mode 'fixed' or 'optimistic-test'"
            )
        _, val_score_array, val_label_array = align_wide_tables(val_scores, val_labels, id_column, queries, "validation")

    thresholds = choose_thresholds(
        queries, threshold_mode,
        test_scores=scores, test_labels=labels,
        val_scores=val_score_array, val_labels=val_label_array,
        fixed_threshold=fixed_threshold,
    )
    source = {"validation": "validation", "optimistic-test": OPTIMISTIC_LABEL, "fixed": "fixed"}[threshold_mode]
    return evaluate_arrays(queries, scores, labels, thresholds, bootstrap=bootstrap, threshold_source=source)


def long_to_wide(long: pl.DataFrame, value: str, id_column: str = "image_id", query_column: str = "query") -> pl.DataFrame:
    """Pivot a long table (one row per image and query) to one column per query."""
    repeated = long.height - long.select(id_column, query_column).unique().height
    if repeated:
        raise ValueError(f"{repeated} (image, query) pair(s) repeat in the long table; expected one row each")
    return long.pivot(on=query_column, index=id_column, values=value, maintain_order=True)
