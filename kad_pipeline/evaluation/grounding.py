"""Pointing game for attention-map grounding.

For each (image, finding) pair with a ground-truth box, the attention map of that finding's
query is upsampled bilinearly to the image size. The pair is a hit when the centre of the
maximum pixel lies inside any box of that finding on that image (borders count as inside).
"""

from __future__ import annotations

import logging

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

POINT_SCHEMA = {"image_id": pl.String, "finding": pl.String, "point_x": pl.Float64, "point_y": pl.Float64,
                "boxes": pl.Int64, "hit": pl.Boolean}
SUMMARY_SCHEMA = {"finding": pl.String, "pairs": pl.Int64, "hits": pl.Int64, "hit_rate": pl.Float64}
OVERALL_ROW = "overall"


def attention_peak(attention: np.ndarray, height: int, width: int) -> tuple[float, float]:
    """Return the (x, y) pixel centre of the maximum of ``attention`` upsampled to (height, width).

    ``attention`` has shape (h, w). Upsampling is bilinear with ``align_corners=False``, so
    each attention cell covers an equal share of the image. On ties the first maximum in
    row-major order wins. Coordinates are in pixels of the (height, width) image, with the
    centre of pixel (row, col) at (col + 0.5, row + 0.5).
    """
    attention = np.asarray(attention, dtype=np.float32)
    if attention.ndim != 2:
        raise ValueError(f"attention map must have shape (h, w), got {attention.shape}")
    if not np.isfinite(attention).all():
        raise ValueError("attention map contains NaN or infinite values")
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")

    upsampled = F.interpolate(torch.from_numpy(attention)[None, None], size=(int(height), int(width)),
                              mode="bilinear", align_corners=False)[0, 0]
    flat_index = int(torch.argmax(upsampled))
    row, col = divmod(flat_index, int(width))
    return col + 0.5, row + 0.5


def point_in_boxes(x: float, y: float, boxes: np.ndarray) -> bool:
    """Return whether (x, y) lies inside any box of shape (k, 4) given as x0, y0, x1, y1."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    inside = (boxes[:, 0] <= x) & (x <= boxes[:, 2]) & (boxes[:, 1] <= y) & (y <= boxes[:, 3])
    return bool(inside.any())


def pointing_game(
    attention: dict[tuple[str, str], np.ndarray],
    boxes: pl.DataFrame,
    image_sizes: dict[str, tuple[int, int]],
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Score the pointing game for every (image, finding) pair in ``boxes``.

    ``attention`` maps (image_id, query) to an (h, w) map, ``boxes`` has columns image_id,
    finding, x0, y0, x1, y1 in pixels of the image, and ``image_sizes`` maps image_id to
    (height, width). Raises ``ValueError`` when a boxed pair has no attention map or image
    size, because a silent skip would inflate the hit rate.

    Returns (points, summary): one row per pair with the peak and the hit, and one row per
    finding plus an "overall" row (hits over all pairs, so findings with more boxes weigh more).
    """
    missing_columns = [c for c in ("image_id", "finding", "x0", "y0", "x1", "y1") if c not in boxes.columns]
    if missing_columns:
        raise ValueError(f"box table lacks columns {missing_columns}")

    points: list[dict] = []
    grouped = boxes.group_by("image_id", "finding", maintain_order=True).agg(pl.col("x0", "y0", "x1", "y1"))
    missing_maps = [(i, f) for i, f in grouped.select("image_id", "finding").iter_rows() if (i, f) not in attention]
    if missing_maps:
        raise ValueError(f"{len(missing_maps)} boxed (image, finding) pair(s) have no attention map, "
                         f"e.g. {missing_maps[:3]}; score those images with attention for those queries")
    missing_sizes = sorted({i for i in grouped.get_column("image_id").to_list() if i not in image_sizes})
    if missing_sizes:
        raise ValueError(f"{len(missing_sizes)} boxed image(s) have no size, e.g. {missing_sizes[:3]}")

    for image_id, finding, x0, y0, x1, y1 in grouped.iter_rows():
        height, width = image_sizes[image_id]
        x, y = attention_peak(attention[(image_id, finding)], height, width)
        pair_boxes = np.column_stack([x0, y0, x1, y1])
        points.append({"image_id": image_id, "finding": finding, "point_x": x, "point_y": y,
                       "boxes": len(x0), "hit": point_in_boxes(x, y, pair_boxes)})

    point_table = pl.DataFrame(points, schema=POINT_SCHEMA)
    summary = summarize_pointing_game(point_table)
    overall = summary.filter(pl.col("finding") == OVERALL_ROW).row(0, named=True)
    logger.info("pointing game: %d hits of %d pairs over %d findings", overall["hits"], overall["pairs"],
                summary.height - 1)
    return point_table, summary


def summarize_pointing_game(points: pl.DataFrame) -> pl.DataFrame:
    """Return hits, pairs and hit rate per finding plus an "overall" row."""
    per_finding = (
        points.group_by("finding", maintain_order=True)
        .agg(pl.len().cast(pl.Int64).alias("pairs"), pl.col("hit").sum().cast(pl.Int64).alias("hits"))
        .sort("finding")
    )
    total_pairs = int(per_finding.get_column("pairs").sum()) if per_finding.height else 0
    total_hits = int(per_finding.get_column("hits").sum()) if per_finding.height else 0
    overall = pl.DataFrame({"finding": [OVERALL_ROW], "pairs": [total_pairs], "hits": [total_hits]},
                           schema={"finding": pl.String, "pairs": pl.Int64, "hits": pl.Int64})
    table = pl.concat([per_finding, overall])
    return table.with_columns(
        pl.when(pl.col("pairs") > 0).then(pl.col("hits") / pl.col("pairs")).otherwise(None).alias("hit_rate")
    ).select(list(SUMMARY_SCHEMA))
