"""Scoring of presence labels against the Open-i gold standard of ChestX-ray14 findings.

The gold file (``openi-gold/labels_dev.csv``, from the NegBio project) has one row per
Open-i report (``filename`` is the report id) and 0/1 columns for 14 findings, where 1 means
positively present. It has no Hernia positives although reports mention hernias, so
``SCORED_FINDINGS`` leaves Hernia out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

# Gold finding -> the query entities whose presence means that finding.
GOLD_FINDING_QUERIES: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("atelectasis", "collapse"),
    "Cardiomegaly": ("cardiomegaly",),
    "Effusion": ("pleural effusion",),
    "Infiltration": ("infiltration",),
    "Mass": ("mass",),
    "Nodule": ("nodule",),
    "Pneumonia": ("pneumonia",),
    "Pneumothorax": ("pneumothorax",),
    "Consolidation": ("consolidation",),
    "Edema": ("edema",),
    "Emphysema": ("emphysema",),
    "Fibrosis": ("fibrosis",),
    "Pleural_Thickening": ("pleural thicken",),
    "Hernia": ("hernia",),
}
SCORED_FINDINGS: tuple[str, ...] = tuple(finding for finding in GOLD_FINDING_QUERIES if finding != "Hernia")


def gold_queries() -> list[str]:
    """Return every query entity the gold findings need, in a stable order."""
    queries: list[str] = []
    for names in GOLD_FINDING_QUERIES.values():
        queries.extend(name for name in names if name not in queries)
    return queries


def load_gold(path: str | Path) -> pl.DataFrame:
    """Read the gold CSV as ``report_id`` plus one Int8 column per finding."""
    gold = pl.read_csv(path)
    if "filename" not in gold.columns:
        raise ValueError(f"{path} has no filename column; expected the Open-i gold standard layout")
    missing = [finding for finding in SCORED_FINDINGS if finding not in gold.columns]
    if missing:
        raise ValueError(f"{path} lacks the gold columns {missing}")
    return gold.rename({"filename": "report_id"}).with_columns(pl.col(SCORED_FINDINGS).cast(pl.Int8))


def predicted_findings(labels: pl.DataFrame, uncertain_as: int) -> pl.DataFrame:
    """Turn a label matrix into 0/1 finding columns: present is 1, uncertain is ``uncertain_as``."""
    if uncertain_as not in (0, 1):
        raise ValueError(f"uncertain_as must be 0 or 1, got {uncertain_as}")
    columns = [pl.col("report_id")]
    for finding, queries in GOLD_FINDING_QUERIES.items():
        present = [
            pl.when(pl.col(query) == 1).then(1).when(pl.col(query) == -1).then(uncertain_as).otherwise(0)
            for query in queries if query in labels.columns
        ]
        expression = pl.max_horizontal(present) if present else pl.lit(0)
        columns.append(expression.cast(pl.Int8).alias(finding))
    return labels.select(columns)


@dataclass
class Scores:
    """Micro and macro F1 over the scored findings, and per-finding counts."""

    micro_f1: float
    macro_f1: float
    per_finding: pl.DataFrame  # finding, support, tp, fp, fn, precision, recall, f1


def score(predicted: pl.DataFrame, gold: pl.DataFrame, findings: Sequence[str] = SCORED_FINDINGS) -> Scores:
    """Score 0/1 predictions against gold on the reports both tables share."""
    joined = gold.join(predicted, on="report_id", how="inner", suffix="_pred")
    if joined.height == 0:
        raise ValueError("predictions and gold share no report_id; check that both come from Open-i")
    rows = []
    total_tp = total_fp = total_fn = 0
    for finding in findings:
        truth = joined[finding].to_numpy()
        guess = joined[f"{finding}_pred"].to_numpy()
        tp = int(((truth == 1) & (guess == 1)).sum())
        fp = int(((truth == 0) & (guess == 1)).sum())
        fn = int(((truth == 1) & (guess == 0)).sum())
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
        rows.append((finding, int(truth.sum()), tp, fp, fn, precision, recall, f1))
        total_tp, total_fp, total_fn = total_tp + tp, total_fp + fp, total_fn + fn
    per_finding = pl.DataFrame(
        rows, schema=["finding", "support", "tp", "fp", "fn", "precision", "recall", "f1"], orient="row"
    )
    micro = 2 * total_tp / (2 * total_tp + total_fp + total_fn) if total_tp + total_fp + total_fn else 1.0
    return Scores(micro, float(per_finding["f1"].mean()), per_finding)
