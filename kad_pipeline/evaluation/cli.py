"""The ``kad evaluate`` subcommand: metrics with bootstrap intervals for scores from any model."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

import polars as pl

from kad_pipeline.evaluation.metrics import BootstrapSettings, evaluate_tables

logger = logging.getLogger(__name__)


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``kad evaluate`` options to ``parser``."""
    parser.add_argument("--scores", required=True, type=Path,
                        help="test scores: CSV or Parquet with an id column and one column per query")
    parser.add_argument("--labels", required=True, type=Path,
                        help="test labels: same layout, values 1, 0 or empty (missing)")
    parser.add_argument("--output", required=True, type=Path,
                        help="metrics table to write (.csv or .parquet), one row per query plus 'macro'")
    parser.add_argument("--val-scores", type=Path, help="validation scores, used to choose thresholds")
    parser.add_argument("--val-labels", type=Path, help="validation labels, used to choose thresholds")
    parser.add_argument("--id-column", default="image_id", help="name of the id column (default: image_id)")
    parser.add_argument("--queries", nargs="+", metavar="QUERY",
                        help="evaluate only these query columns (default: every label column)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="paired bootstrap resamples; 0 disables intervals (default: 1000)")
    parser.add_argument("--alpha", type=float, default=0.05,
                        help="1 - confidence level of the intervals (default: 0.05 for 95%%)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples (default: 0)")
    threshold = parser.add_mutually_exclusive_group()
    threshold.add_argument("--fixed-threshold", type=float, metavar="T",
                           help="use this decision threshold for every query instead of choosing one")
    threshold.add_argument("--optimistic-test-thresholds", action="store_true",
                           help="choose MCC-optimal thresholds on the test set itself, as the KAD reference "
                                "code does; MCC, F1 and accuracy are then optimistic and labelled so")


def read_table(path: Path) -> pl.DataFrame:
    """Read a CSV or Parquet table, choosing the reader by file extension."""
    if not path.exists():
        raise FileNotFoundError(f"table not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return pl.read_parquet(path)
    if suffix in (".csv", ".gz", ".txt"):
        return pl.read_csv(path, infer_schema_length=10_000)
    raise ValueError(f"unsupported table format {suffix!r} for {path}; use .csv or .parquet")


def write_table(frame: pl.DataFrame, path: Path) -> None:
    """Write ``frame`` as CSV or Parquet atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            frame.write_parquet(temporary)
        else:
            frame.write_csv(temporary, float_precision=6)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``kad evaluate`` and return the exit status (0 success, 2 invalid input)."""
    if (args.val_scores is None) != (args.val_labels is None):
        logger.error("--val-scores and --val-labels must be given together")
        return 2
    if args.fixed_threshold is not None:
        mode = "fixed"
    elif args.optimistic_test_thresholds:
        mode = "optimistic-test"
    elif args.val_scores is not None:
        mode = "validation"
    else:
        logger.error("no way to choose thresholds: pass --val-scores and --val-labels, "
                     "--fixed-threshold T, or --optimistic-test-thresholds")
        return 2

    try:
        bootstrap = BootstrapSettings(n_resamples=args.bootstrap, alpha=args.alpha, seed=args.seed)
        table = evaluate_tables(
            read_table(args.scores),
            read_table(args.labels),
            id_column=args.id_column,
            queries=args.queries,
            val_scores=read_table(args.val_scores) if mode == "validation" else None,
            val_labels=read_table(args.val_labels) if mode == "validation" else None,
            threshold_mode=mode,
            fixed_threshold=args.fixed_threshold,
            bootstrap=bootstrap,
        )
    except (ValueError, FileNotFoundError, pl.exceptions.PolarsError) as error:
        logger.error("evaluation failed: %s", error)
        return 2

    write_table(table, args.output)
    macro = table.filter(pl.col("query") == "macro").row(0, named=True)
    logger.info("wrote %d query rows and the macro row to %s (macro AUC %.4f [%.4f, %.4f], thresholds: %s)",
                table.height - 1, args.output, macro["auc"], macro["auc_low"], macro["auc_high"], mode)
    return 0
