"""Zero-shot scoring: run a KAD model over images in batches and collect probabilities.

The model is anything with ``score(images, query_embeddings) -> (probs (B, Q), attention
(B, Q, h, w))``. Every image is scored: the last batch is kept even when it is short.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from PIL import Image

logger = logging.getLogger(__name__)

SCORE_SCHEMA = {"image_id": pl.String, "query": pl.String, "probability": pl.Float64}
IMAGE_SIZE_SCHEMA = {"image_id": pl.String, "height": pl.Int64, "width": pl.Int64}


@dataclass
class ScoringResult:
    """Scores of one run: the long table, optional attention maps and the original image sizes."""

    scores: pl.DataFrame  # image_id, query, probability; one row per image and query
    image_sizes: pl.DataFrame  # image_id, height, width in pixels of the stored image
    attention: np.ndarray | None  # (n_images, n_queries, h, w) float32, rows in image_ids order
    image_ids: list[str]
    queries: list[str]

    def attention_by_pair(self) -> dict[tuple[str, str], np.ndarray]:
        """Return the attention maps keyed by (image_id, query)."""
        if self.attention is None:
            raise ValueError("this scoring run kept no attention maps; score with keep_attention=True")
        return {
            (image_id, query): self.attention[i, q]
            for i, image_id in enumerate(self.image_ids)
            for q, query in enumerate(self.queries)
        }


def load_grayscale(path: str | Path) -> np.ndarray:
    """Read a radiograph as float32 pixels in [0, 1], shape (H, W).

    8-bit images are divided by 255. Images with more bits are min-max scaled per image,
    because the container depth differs from the range used: PadChest stores 16-bit PNGs,
    and its label table lists BitsStored_DICOM 12 or 10 for them.
    """
    with Image.open(path) as image:
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            pixels = np.asarray(image, dtype=np.float32)
            low, high = float(pixels.min()), float(pixels.max())
            return (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def _resize(pixels: np.ndarray, image_size: int) -> torch.Tensor:
    tensor = torch.from_numpy(pixels)[None, None]
    return F.interpolate(tensor, size=(image_size, image_size), mode="bilinear", align_corners=False,
                         antialias=True)[0]


def score_images(
    model,
    image_paths: Sequence[str | Path],
    image_ids: Sequence[str],
    query_embeddings: torch.Tensor,
    queries: Sequence[str],
    *,
    image_size: int,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 32,
    keep_attention: bool = False,
    device: str | torch.device = "cpu",
    loader: Callable[[str | Path], np.ndarray] = load_grayscale,
    score_kwargs: dict | None = None,
) -> ScoringResult:
    """Score every image against every query.

    Images are read with ``loader`` as (H, W) pixels in [0, 1] and resized to an
    ``image_size`` square without keeping the aspect ratio. They are stacked as (B, 1, S, S)
    and passed through ``normalize`` before ``model.score``, which also gets ``score_kwargs``.
    For a ``KADModel``, ``{"layer": "mean"}`` averages the attention of all decoder layers
    instead of taking the last. Raises
    ``ValueError`` when the model returns shapes other than (B, Q) and (B, Q, h, w), or
    non-finite probabilities, naming the batch's first image.
    """
    if len(image_paths) != len(image_ids):
        raise ValueError(f"{len(image_paths)} image paths but {len(image_ids)} image ids")
    if len(set(image_ids)) != len(image_ids):
        raise ValueError("image ids repeat; score each image once")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    queries = list(queries)
    if query_embeddings.shape[0] != len(queries):
        raise ValueError(f"{query_embeddings.shape[0]} query embeddings but {len(queries)} query names")

    query_embeddings = query_embeddings.to(device)
    probabilities = np.empty((len(image_ids), len(queries)), dtype=np.float64)
    attention_maps: list[np.ndarray] = []
    sizes: list[tuple[int, int]] = []
    logger.info("scoring %d images against %d queries in batches of %d", len(image_ids), len(queries), batch_size)

    for start in range(0, len(image_ids), batch_size):
        stop = min(start + batch_size, len(image_ids))
        batch_pixels = []
        for path in image_paths[start:stop]:
            pixels = loader(path)
            sizes.append(pixels.shape[:2])
            batch_pixels.append(_resize(pixels, image_size))
        images = normalize(torch.stack(batch_pixels).to(device))

        with torch.no_grad():
            probs, attention = model.score(images, query_embeddings, **(score_kwargs or {}))
        expected = (stop - start, len(queries))
        if tuple(probs.shape) != expected:
            raise ValueError(f"model returned probabilities of shape {tuple(probs.shape)} for batch starting at "
                             f"{image_ids[start]!r}; expected {expected}")
        if attention.dim() != 4 or tuple(attention.shape[:2]) != expected:
            raise ValueError(f"model returned attention of shape {tuple(attention.shape)}; expected {expected} + (h, w)")
        batch_probs = probs.detach().float().cpu().numpy()
        if not np.isfinite(batch_probs).all():
            raise ValueError(f"model returned NaN or infinite probabilities in the batch starting at {image_ids[start]!r}")

        probabilities[start:stop] = batch_probs
        if keep_attention:
            attention_maps.append(attention.detach().float().cpu().numpy())

    scores = pl.DataFrame(
        {
            "image_id": np.repeat(np.asarray(image_ids, dtype=object), len(queries)).tolist(),
            "query": queries * len(image_ids),
            "probability": probabilities.ravel(),
        },
        schema=SCORE_SCHEMA,
    )
    image_sizes = pl.DataFrame(
        {"image_id": list(image_ids), "height": [s[0] for s in sizes], "width": [s[1] for s in sizes]},
        schema=IMAGE_SIZE_SCHEMA,
    )
    attention_array = np.concatenate(attention_maps) if keep_attention and attention_maps else None
    logger.info("scored %d images (%d rows)", len(image_ids), scores.height)
    return ScoringResult(scores, image_sizes, attention_array, list(image_ids), queries)


def score_with_kad_model(model, image_paths, image_ids, query_embeddings, queries, **kwargs) -> ScoringResult:
    """Score with a ``KADModel``, taking image size and normalization from its config."""
    config = model.config
    return score_images(model, image_paths, image_ids, query_embeddings, queries,
                        image_size=int(config.image_size), normalize=model.normalize, **kwargs)


def scores_table(result: ScoringResult, splits: dict[str, str] | None = None) -> pl.DataFrame:
    """Flatten a scoring run into one table, attention maps included as list columns.

    Columns: image_id, query, probability, split (from ``splits``, null when absent),
    image_height, image_width, and when attention was kept: attention (row-major list of
    h * w floats), attention_height, attention_width.
    """
    table = result.scores.join(result.image_sizes, on="image_id", how="left", maintain_order="left").rename(
        {"height": "image_height", "width": "image_width"}
    )
    table = table.with_columns(
        pl.col("image_id").replace_strict(splits or {}, default=None, return_dtype=pl.String).alias("split")
    )
    if result.attention is not None:
        n_images, n_queries, height, width = result.attention.shape
        flat = result.attention.reshape(n_images * n_queries, height * width).astype(np.float32)
        table = table.with_columns(
            pl.Series("attention", flat, dtype=pl.Array(pl.Float32, height * width)).cast(pl.List(pl.Float32)),
            pl.lit(height, dtype=pl.Int32).alias("attention_height"),
            pl.lit(width, dtype=pl.Int32).alias("attention_width"),
        )
    return table


def attention_maps_from_table(table: pl.DataFrame) -> dict[tuple[str, str], np.ndarray]:
    """Rebuild the (h, w) attention maps of a ``scores_table``, keyed by (image_id, query)."""
    if "attention" not in table.columns:
        raise ValueError("the scores table has no attention column; score with keep_attention=True")
    maps = {}
    for image_id, query, values, height, width in table.select(
        "image_id", "query", "attention", "attention_height", "attention_width"
    ).iter_rows():
        maps[(image_id, query)] = np.asarray(values, dtype=np.float32).reshape(height, width)
    return maps
