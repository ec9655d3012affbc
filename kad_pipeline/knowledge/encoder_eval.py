"""Evaluation of knowledge encoders: name-to-definition retrieval and query similarity heatmaps."""

from __future__ import annotations

import io
import logging

import polars as pl
import torch

logger = logging.getLogger(__name__)


def retrieval_metrics(queries: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Score retrieval of candidate `targets[i]` for query i by cosine similarity.

    `queries` (N, d) and `candidates` (M, d) must be L2-normalized. The rank of the correct
    candidate is 1 plus the number of candidates scoring strictly higher, so ties count in
    the query's favour. Returns top1, top5 (fractions) and mrr (mean reciprocal rank).
    """
    if queries.shape[0] != targets.shape[0]:
        raise ValueError(f"{queries.shape[0]} queries but {targets.shape[0]} targets")
    if queries.shape[0] == 0:
        raise ValueError("retrieval needs at least one query")
    scores = queries.float() @ candidates.float().T  # (N, M)
    correct = scores.gather(1, targets.view(-1, 1))  # (N, 1)
    ranks = (scores > correct).sum(dim=1) + 1  # (N,)
    return {
        "top1": float((ranks <= 1).float().mean()),
        "top5": float((ranks <= 5).float().mean()),
        "mrr": float((1.0 / ranks.float()).mean()),
    }


def held_out_retrieval_set(
    concepts: pl.DataFrame, definitions: pl.DataFrame, held_out: set[str], max_concepts: int | None = None
) -> pl.DataFrame:
    """Return (concept_id, preferred_name, definition) for held-out concepts, one definition each.

    The first definition of each concept is used. With `max_concepts`, the first concepts by
    concept_id are kept, so the set is the same on every run.
    """
    ids = pl.Series(sorted(held_out), dtype=pl.String)
    table = (
        definitions.filter(pl.col("concept_id").is_in(ids))
        .group_by("concept_id", maintain_order=True)
        .agg(pl.col("definition").first())
        .join(concepts.select("concept_id", "preferred_name"), on="concept_id", how="inner")
        .sort("concept_id")
        .select("concept_id", "preferred_name", "definition")
    )
    if max_concepts is not None:
        table = table.head(max_concepts)
    return table


def evaluate_name_to_definition(encoder, retrieval_set: pl.DataFrame, project: bool = True, batch_size: int = 64) -> dict[str, float]:
    """Encode names and definitions of `retrieval_set` and score name-to-definition retrieval."""
    names = encoder.encode(retrieval_set["preferred_name"].to_list(), batch_size=batch_size, project=project)
    definitions = encoder.encode(retrieval_set["definition"].to_list(), batch_size=batch_size, project=project)
    metrics = retrieval_metrics(names, definitions, torch.arange(retrieval_set.height))
    metrics["queries"] = retrieval_set.height
    return metrics


def similarity_heatmap_png(names: list[str], matrices: dict[str, torch.Tensor], title: str = "") -> bytes:
    """Draw one cosine-similarity heatmap per encoder side by side; return PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(6.0, 0.22 * len(names) + 2.5)
    figure, axes = plt.subplots(1, len(matrices), figsize=(size * len(matrices), size), squeeze=False)
    for axis, (label, matrix) in zip(axes[0], matrices.items()):
        image = axis.imshow(matrix.numpy(), vmin=-1.0, vmax=1.0, cmap="RdBu_r")
        axis.set_title(label)
        axis.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        axis.set_yticks(range(len(names)), names, fontsize=7)
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="cosine similarity")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()
