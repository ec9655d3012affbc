"""Demo images: synthetic radiographs drawn from the Open-i reports' MeSH annotations."""

import tempfile
from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field

from assets.metadata import markdown_image
from kad_pipeline.images.synthetic import GENERATOR_VERSION, PLANTED_FINDINGS, generate_openi_images
from resources.storage import ArtifactStorageResource

IMAGES_KEY = "images/synthetic-openi"


class SyntheticImagesConfig(dg.Config):
    """Settings of the synthetic radiograph generator."""

    size: int = Field(default=128, description="Image side in pixels.")
    images_per_report: int = Field(default=1, description="Images drawn per report (Open-i links 1 to 5).")


@dg.multi_asset(
    outs={
        "image_manifest": dg.AssetOut(
            description="One row per image: image_id, report_id, path (URI), split (train, valid, test "
            "by a stable hash of the report id), source, planted findings. The demo's images are "
            "SYNTHETIC pictures drawn from each Open-i report's expert MeSH annotations.",
            code_version=f"image-manifest-{GENERATOR_VERSION}",
            kinds={"polars", "parquet"},
        ),
        "image_annotations": dg.AssetOut(
            description="Ground truth of the synthetic images: one row per planted finding with its "
            "query name, side, source MeSH term and pixel box (x0, y0, x1, y1; x1 and y1 exclusive).",
            code_version=f"image-annotations-{GENERATOR_VERSION}",
            kinds={"polars", "parquet"},
        ),
    },
    group_name="training",
)
def image_manifest(
    context: dg.AssetExecutionContext,
    config: SyntheticImagesConfig,
    storage: ArtifactStorageResource,
    reports: pl.DataFrame,
):
    """Draw a synthetic frontal radiograph for each Open-i report and record the planted boxes."""
    store = storage.store()
    local_root = store.local_path(IMAGES_KEY)
    with tempfile.TemporaryDirectory(prefix="kad-synthetic-") as scratch:
        target = local_root if local_root is not None else Path(scratch)
        manifest, annotations = generate_openi_images(
            reports, target, size=config.size, images_per_report=config.images_per_report
        )
        if local_root is None:
            # Object storage: upload the drawn files and point the manifest at their URIs.
            uris = [store.put_file(path, f"{IMAGES_KEY}/{Path(path).name}") for path in manifest["path"].to_list()]
            manifest = manifest.with_columns(pl.Series("path", uris, dtype=pl.String))

    if manifest.height == 0:
        raise ValueError(
            "no synthetic images were drawn: the reports have no Open-i image ids. The demo image "
            "generator needs Open-i reports; use a real image manifest for other collections."
        )
    splits = dict(manifest.group_by("split").len().rows())
    prevalence = {
        finding: int(annotations.filter(pl.col("finding") == finding)["image_id"].n_unique())
        for finding in PLANTED_FINDINGS
    }
    context.log.info("Drew %d synthetic images (%s) under %s", manifest.height, splits, store.uri(IMAGES_KEY))
    example = _example_grid(store, manifest, annotations)
    yield dg.Output(
        manifest,
        output_name="image_manifest",
        metadata={
            "images": manifest.height,
            "splits": dg.MetadataValue.json(splits),
            "image_root": store.uri(IMAGES_KEY),
            "examples": dg.MetadataValue.md(markdown_image(example, "synthetic radiographs with planted boxes")),
        },
    )
    yield dg.Output(
        annotations,
        output_name="image_annotations",
        metadata={"boxes": annotations.height, "images_with_finding": dg.MetadataValue.json(prevalence)},
    )


def _example_grid(store, manifest: pl.DataFrame, annotations: pl.DataFrame, count: int = 8) -> bytes:
    """Return a PNG of a few images that have findings, with their boxes drawn in red."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    tiles = []
    for row in manifest.filter(pl.col("findings").list.len() > 0).head(count).iter_rows(named=True):
        image = Image.open(io.BytesIO(store.get_bytes(row["path"]))).convert("RGB")
        draw = ImageDraw.Draw(image)
        for box in annotations.filter(pl.col("image_id") == row["image_id"]).iter_rows(named=True):
            draw.rectangle([box["x0"], box["y0"], box["x1"] - 1, box["y1"] - 1], outline=(255, 0, 0))
        tiles.append(np.asarray(image))
    if not tiles:
        return b""
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate(tiles, axis=1)).save(buffer, format="PNG")
    return buffer.getvalue()
