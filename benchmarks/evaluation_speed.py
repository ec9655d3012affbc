"""Time the vectorized bootstrap evaluation at PadChest scale against a plain scikit-learn loop.

Default data: 39,053 images (the size of PadChest's physician-annotated subset) and 193
queries (174 findings and 19 diagnoses). Labels are synthetic, with prevalences spread
log-uniformly from 0.05% to 30%, and scores are rounded to 3 decimals so ties occur. Each
run draws 1,000 paired bootstrap resamples of AUC, MCC, F1 and accuracy. ``--padchest`` uses the real labels
of that subset instead (191 labels besides "exclude" and "suboptimal study" in the
01.02.19 table), still with synthetic scores. The plain loop
calls ``roc_auc_score``, ``matthews_corrcoef``, ``f1_score`` and ``accuracy_score`` once per
query and resample. It is timed on a few resamples of a few queries and extrapolated.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np


def make_data(n_images: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    prevalence = np.exp(rng.uniform(np.log(0.0005), np.log(0.3), size=n_queries))
    labels = (rng.random((n_images, n_queries)) < prevalence).astype(np.float64)
    scores = np.round(1 / (1 + np.exp(-(rng.normal(size=labels.shape) + 1.5 * labels - 1))), 3)
    return scores, labels


def padchest_labels(seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return synthetic scores for the real labels of PadChest's physician-annotated subset.

    The label table is the copy that torchxrayvision ships; raises FileNotFoundError without it.
    """
    from pathlib import Path

    import torchxrayvision

    from kad_pipeline.evaluation.datasets import read_padchest

    table = Path(torchxrayvision.__file__).parent / "data" / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
    result = read_padchest(table, annotated_only=True)
    labels = result.labels.select(result.queries).to_numpy().astype(np.float64)
    rng = np.random.default_rng(seed)
    scores = np.round(1 / (1 + np.exp(-(rng.normal(size=labels.shape) + 1.5 * labels - 1))), 3)
    return scores, labels, result.queries


def time_sklearn_loop(scores, labels, thresholds, n_queries: int, n_resamples: int, seed: int) -> float:
    """Return seconds per (query, resample) of the plain scikit-learn loop."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, roc_auc_score

    rng = np.random.default_rng(seed)
    n = scores.shape[0]
    start = time.perf_counter()
    for q in range(n_queries):
        for _ in range(n_resamples):
            index = rng.integers(0, n, n)
            y = labels[index, q]
            s = scores[index, q]
            predicted = s >= thresholds[q]
            if 0 < y.sum() < y.size:
                roc_auc_score(y, s)
            matthews_corrcoef(y, predicted)
            f1_score(y, predicted, zero_division=0)
            accuracy_score(y, predicted)
    return (time.perf_counter() - start) / (n_queries * n_resamples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=39_053, help="number of test images")
    parser.add_argument("--queries", type=int, default=193, help="number of queries")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="random seed for data and resamples")
    parser.add_argument("--padchest", action="store_true",
                        help="use the real labels of PadChest's annotated subset (from torchxrayvision) "
                             "instead of synthetic ones; --images and --queries are then ignored")
    parser.add_argument("--sklearn-queries", type=int, default=2, help="queries timed for the scikit-learn loop")
    parser.add_argument("--sklearn-resamples", type=int, default=5, help="resamples per query timed for the scikit-learn loop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from kad_pipeline.evaluation.metrics import BootstrapSettings, choose_thresholds, evaluate_arrays

    if args.padchest:
        scores, labels, queries = padchest_labels(args.seed)
        args.images, args.queries = labels.shape
    else:
        scores, labels = make_data(args.images, args.queries, args.seed)
        queries = [f"finding {i}" for i in range(args.queries)]
    print(f"images={args.images} queries={args.queries} resamples={args.resamples} "
          f"threads={os.environ.get('OMP_NUM_THREADS', 'default')} cpus={os.cpu_count()}")

    start = time.perf_counter()
    thresholds = choose_thresholds(queries, "optimistic-test", test_scores=scores, test_labels=labels)
    threshold_seconds = time.perf_counter() - start

    start = time.perf_counter()
    table = evaluate_arrays(queries, scores, labels, thresholds,
                            bootstrap=BootstrapSettings(n_resamples=args.resamples, seed=args.seed))
    evaluate_seconds = time.perf_counter() - start
    macro = table.filter(table["query"] == "macro").row(0, named=True)
    print(f"threshold search (MCC at every distinct score, all queries): {threshold_seconds:.2f} s")
    print(f"vectorized evaluation with bootstrap: {evaluate_seconds:.1f} s "
          f"(macro AUC {macro['auc']:.4f} [{macro['auc_low']:.4f}, {macro['auc_high']:.4f}])")

    per_pair = time_sklearn_loop(scores, labels, thresholds, args.sklearn_queries, args.sklearn_resamples, args.seed)
    extrapolated = per_pair * args.queries * args.resamples
    print(f"plain scikit-learn loop: {per_pair * 1000:.0f} ms per query and resample, "
          f"measured on {args.sklearn_queries} queries x {args.sklearn_resamples} resamples; "
          f"extrapolated to {args.queries} x {args.resamples}: {extrapolated / 3600:.1f} h (an estimate)")
    print(f"speed-up: {extrapolated / evaluate_seconds:.0f}x")
    options = "".join(
        f" --{name.replace('_', '-')} {value}" for name, value in vars(args).items()
        if name != "padchest" and not (args.padchest and name in ("images", "queries"))
    )
    print("reproduce: taskset -c 0,1 .venv/bin/python benchmarks/evaluation_speed.py"
          + (" --padchest" if args.padchest else "") + options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
