"""Zero-shot evaluation assets: scores, metrics with bootstrap intervals, grounding and the report."""


import io
import json
import tempfile
from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field

from assets.metadata import markdown_image, markdown_table
from kad_pipeline import __version__ as KAD_PIPELINE_VERSION
from kad_pipeline.evaluation.datasets import labels_from_annotations
from kad_pipeline.evaluation.grounding import pointing_game, summarize_pointing_game
from kad_pipeline.evaluation.metrics import BootstrapSettings, align_wide_tables, evaluate_tables, long_to_wide
from kad_pipeline.evaluation.report import GroundingExample, ReportInputs, build_report
from kad_pipeline.evaluation.scoring import (
    attention_maps_from_table, load_grayscale, score_with_kad_model, scores_table,
)
from resources.storage import ArtifactStorageResource

GROUP = "evaluation"
EVALUATED_SPLITS = ("valid", "test")  # valid chooses the thresholds, test is reported
REPORT_KEY = "reports/evaluation"


class ZeroShotConfig(dg.Config):
    """Settings of zero-shot scoring."""

    batch_size: int = Field(default=32, description="Images per forward pass; the last batch may be shorter.")
    attention_layer: str = Field(default="last", description="Cross-attention maps kept: 'last' layer or 'mean' of all.")
    device: str = Field(default="cpu", description="Torch device, e.g. 'cpu' or 'cuda:0'.")
    queries: list[str] = Field(default_factory=list,
                               description="Query names to score; empty means every finding in image_annotations.")


class MetricsConfig(dg.Config):
    """Settings of the metric table."""

    n_resamples: int = Field(default=1000, description="Paired bootstrap resamples of the test images (0: none).")
    alpha: float = Field(default=0.05, description="1 - confidence level of the intervals.")
    seed: int = Field(default=0, description="Seed of the bootstrap resamples.")
    threshold_mode: str = Field(
        default="validation",
        description="'validation' (MCC-optimal on the valid split), 'optimistic-test' (on the test split, as "
        "the KAD reference code does; labelled optimistic) or 'fixed'.",
    )
    fixed_threshold: float = Field(default=0.5, description="Threshold of mode 'fixed'.")


class ReportConfig(dg.Config):
    """Settings of the evaluation report."""

    title: str = Field(default="KAD zero-shot evaluation (synthetic demo images)", description="Report title.")
    dataset_key: str | None = Field(
        default=None,
        description="'chestxray14', 'chexpert' or 'padchest' to show the published KAD figures beside ours; "
        "None when the data is not one of those sets (the synthetic demo images are not).",
    )
    grounding_examples: int = Field(default=4, description="Grounding examples drawn in the report.")


def _local_checkpoint(storage: ArtifactStorageResource, model_row: pl.DataFrame, what: str, scratch: str) -> Path:
    if model_row.height != 1 or "checkpoint_uri" not in model_row.columns:
        raise ValueError(f"{what} must be a one-row table with a checkpoint_uri column, got {model_row.shape}")
    uri = model_row.item(0, "checkpoint_uri")
    return storage.get_dir(uri, Path(scratch) / what)


def _local_image_paths(storage: ArtifactStorageResource, uris: list[str], scratch: str) -> list[Path]:
    store = storage.store()
    paths = []
    for index, uri in enumerate(uris):
        if Path(uri).is_file():
            paths.append(Path(uri))
            continue
        local = store.local_path(uri)
        if local is None or not local.is_file():
            local = store.get_file(uri, Path(scratch) / "images" / f"{index:06d}{Path(uri).suffix}")
        paths.append(local)
    return paths


@dg.asset(
    group_name=GROUP,
    code_version="zero-shot-scores-v1",
    kinds={"pytorch", "polars", "parquet"},
)
def zero_shot_scores(
    context: dg.AssetExecutionContext,
    config: ZeroShotConfig,
    storage: ArtifactStorageResource,
    kad_model: pl.DataFrame,
    knowledge_encoder: pl.DataFrame,
    image_manifest: pl.DataFrame,
    image_annotations: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    """Zero-shot probabilities of the KAD model: one row per validation or test image and query.

    The stage-1 knowledge encoder embeds the queries. Each row also carries the image size and
    the Disease Query Network's cross-attention map, which the pointing game reads.
    """
    from kad_pipeline.models.kad import load_kad_model
    from kad_pipeline.models.text_encoder import load_knowledge_encoder

    queries = list(config.queries) or sorted(image_annotations.get_column("finding").unique().to_list())
    if not queries:
        raise ValueError("no queries to score: image_annotations is empty and no queries are configured")
    images = image_manifest.filter(pl.col("split").is_in(EVALUATED_SPLITS)).sort("image_id")
    if images.height == 0:
        raise ValueError(f"image_manifest has no images in splits {EVALUATED_SPLITS}")

    with tempfile.TemporaryDirectory(prefix="kad-eval-") as scratch:
        model = load_kad_model(_local_checkpoint(storage, kad_model, "kad_model", scratch), map_location=config.device)
        encoder = load_knowledge_encoder(_local_checkpoint(storage, knowledge_encoder, "knowledge_encoder", scratch))
        query_embeddings = encoder.encode(queries)
        paths = _local_image_paths(storage, images.get_column("path").to_list(), scratch)
        context.log.info("Scoring %d images against %d queries", images.height, len(queries))
        result = score_with_kad_model(
            model, paths, images.get_column("image_id").to_list(), query_embeddings, queries,
            batch_size=config.batch_size, keep_attention=True, device=config.device,
            score_kwargs={"layer": config.attention_layer},
        )

    splits = dict(images.select("image_id", "split").iter_rows())
    table = scores_table(result, splits)
    return dg.Output(
        table,
        metadata={
            "images": images.height,
            "queries": dg.MetadataValue.json(queries),
            "rows": table.height,
            "attention_layer": config.attention_layer,
            "attention_grid": f"{table.item(0, 'attention_height')}x{table.item(0, 'attention_width')}",
            "checkpoint_uri": kad_model.item(0, "checkpoint_uri"),
        },
    )


def _wide_split(scores: pl.DataFrame, annotations: pl.DataFrame, split: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    part = scores.filter(pl.col("split") == split)
    queries = sorted(part.get_column("query").unique().to_list())
    wide_scores = long_to_wide(part.select("image_id", "query", "probability"), "probability")
    labels = labels_from_annotations(wide_scores.get_column("image_id").to_list(), annotations, queries)
    return wide_scores, labels


@dg.asset(
    group_name=GROUP,
    code_version="evaluation-metrics-v1",
    kinds={"polars", "parquet"},
)
def evaluation_metrics(
    context: dg.AssetExecutionContext,
    config: MetricsConfig,
    zero_shot_scores: pl.DataFrame,
    image_annotations: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    """AUC, MCC, F1 and accuracy per query on the test split, with paired percentile bootstrap intervals.

    Thresholds maximize MCC on the validation split (an image is positive for a finding when
    it has a planted box of it). The last row is the macro mean over queries.
    """
    test_scores, test_labels = _wide_split(zero_shot_scores, image_annotations, "test")
    val_scores, val_labels = _wide_split(zero_shot_scores, image_annotations, "valid")
    settings = BootstrapSettings(n_resamples=config.n_resamples, alpha=config.alpha, seed=config.seed)
    table = evaluate_tables(
        test_scores, test_labels,
        val_scores=val_scores if val_scores.height else None,
        val_labels=val_labels if val_labels.height else None,
        threshold_mode=config.threshold_mode,  # type: ignore[arg-type]
        fixed_threshold=config.fixed_threshold,
        bootstrap=settings,
    )
    macro = table.filter(pl.col("query") == "macro").row(0, named=True)
    context.log.info("Macro AUC %.3f [%.3f, %.3f] over %d queries", macro["auc"], macro["auc_low"],
                     macro["auc_high"], table.height - 1)
    shown = table.select("query", "n", "positives", "auc", "auc_low", "auc_high", "mcc", "f1", "acc")
    return dg.Output(
        table,
        metadata={
            "macro_auc": dg.MetadataValue.float(float(macro["auc"])),
            "test_images": test_scores.height,
            "validation_images": val_scores.height,
            "threshold_mode": config.threshold_mode,
            "bootstrap": dg.MetadataValue.json({"n_resamples": config.n_resamples, "alpha": config.alpha,
                                                "seed": config.seed}),
            "metrics": dg.MetadataValue.md(markdown_table(shown)),
        },
    )


@dg.asset(
    group_name=GROUP,
    code_version="grounding-scores-v1",
    kinds={"polars", "parquet"},
)
def grounding_scores(
    context: dg.AssetExecutionContext,
    zero_shot_scores: pl.DataFrame,
    image_annotations: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    """Pointing game on the test split: one row per (image, finding) with a ground-truth box.

    A hit means the maximum of the upsampled attention map lies inside a box of that finding.
    """
    test = zero_shot_scores.filter(pl.col("split") == "test")
    queries = set(test.get_column("query").unique().to_list())
    test_ids = set(test.get_column("image_id").unique().to_list())
    boxes = image_annotations.filter(pl.col("image_id").is_in(test_ids) & pl.col("finding").is_in(queries))
    skipped = image_annotations.filter(pl.col("image_id").is_in(test_ids)).height - boxes.height
    if skipped:
        context.log.info("Skipped %d test boxes whose finding was not scored", skipped)
    sizes = {row[0]: (row[1], row[2]) for row in
             test.select("image_id", "image_height", "image_width").unique().iter_rows()}
    points, summary = pointing_game(attention_maps_from_table(test), boxes, sizes)
    overall = summary.filter(pl.col("finding") == "overall").row(0, named=True)
    return dg.Output(
        points,
        metadata={
            "pairs": overall["pairs"],
            "overall_hit_rate": dg.MetadataValue.float(float(overall["hit_rate"] or 0.0)),
            "summary": dg.MetadataValue.md(markdown_table(summary)),
        },
    )


def _grounding_examples(storage, points, scores, annotations, manifest, count) -> list[GroundingExample]:
    """Pick up to ``count`` pairs, hits and misses alternating, and load their pixels and maps."""
    hits = points.filter(pl.col("hit")).head(count)
    misses = points.filter(~pl.col("hit")).head(count)
    chosen = []
    for index in range(count):
        for pool in (hits, misses):
            if index < pool.height and len(chosen) < count:
                chosen.append(pool.row(index, named=True))
    store = storage.store()
    paths = dict(manifest.select("image_id", "path").iter_rows())
    examples = []
    for row in chosen:
        pair = scores.filter((pl.col("image_id") == row["image_id"]) & (pl.col("query") == row["finding"]))
        maps = attention_maps_from_table(pair)
        pixels = load_grayscale(io.BytesIO(store.get_bytes(paths[row["image_id"]])))
        boxes = annotations.filter((pl.col("image_id") == row["image_id"]) & (pl.col("finding") == row["finding"]))
        examples.append(GroundingExample(
            row["image_id"], row["finding"], pixels, maps[(row["image_id"], row["finding"])],
            boxes.select("x0", "y0", "x1", "y1").to_numpy(), (row["point_x"], row["point_y"]), row["hit"],
        ))
    return examples


def _upstream_lineage(context: dg.AssetExecutionContext, names: list[str]) -> dict:
    """Return the latest data version and run of each named upstream asset, where recorded."""
    lineage = {}
    for name in names:
        event = context.instance.get_latest_materialization_event(dg.AssetKey(name))
        if event is None or event.asset_materialization is None:
            lineage[name] = "not materialized in this instance"
            continue
        tags = event.asset_materialization.tags or {}
        lineage[name] = {"run_id": event.run_id, "data_version": tags.get("dagster/data_version"),
                         "code_version": tags.get("dagster/code_version")}
    return lineage


@dg.asset(
    group_name=GROUP,
    code_version="evaluation-report-v1",
    kinds={"html", "markdown"},
)
def evaluation_report(
    context: dg.AssetExecutionContext,
    config: ReportConfig,
    storage: ArtifactStorageResource,
    evaluation_metrics: pl.DataFrame,
    grounding_scores: pl.DataFrame,
    zero_shot_scores: pl.DataFrame,
    image_annotations: pl.DataFrame,
    image_manifest: pl.DataFrame,
    kad_model: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    """Write the evaluation report: Markdown plus a self-contained HTML page with the metric
    table, ROC curves, AUC forest plot, grounding examples, model configuration and lineage.
    """
    test_scores, test_labels = _wide_split(zero_shot_scores, image_annotations, "test")
    queries = [q for q in evaluation_metrics.get_column("query").to_list() if q != "macro"]
    queries, score_array, label_array = align_wide_tables(test_scores, test_labels, "image_id", queries)

    with tempfile.TemporaryDirectory(prefix="kad-report-") as scratch:
        checkpoint = _local_checkpoint(storage, kad_model, "kad_model", scratch)
        config_path = checkpoint / "config.json"
        model_config = json.loads(config_path.read_text()) if config_path.is_file() else {"config.json": "missing"}
    thresholds = set(evaluation_metrics.get_column("threshold_source").to_list())
    lineage = {
        "checkpoint": {key: str(value) for key, value in kad_model.row(0, named=True).items()},
        "report_run_id": context.run_id,
        "kad_pipeline_version": KAD_PIPELINE_VERSION,
        "threshold_source": sorted(thresholds),
        "upstream": _upstream_lineage(context, ["kad_model", "knowledge_encoder", "zero_shot_scores",
                                                "evaluation_metrics", "grounding_scores", "image_manifest"]),
    }
    examples = _grounding_examples(storage, grounding_scores, zero_shot_scores, image_annotations, image_manifest,
                                   config.grounding_examples) if grounding_scores.height else []
    summary = summarize_pointing_game(grounding_scores) if grounding_scores.height else None

    report = build_report(ReportInputs(
        title=config.title, metrics=evaluation_metrics, labels=label_array, scores=score_array, queries=queries,
        model_config=model_config, lineage=lineage, dataset_key=config.dataset_key,
        bootstrap=_bootstrap_settings(context), grounding_summary=summary, grounding_examples=examples,
    ))

    key = f"{REPORT_KEY}/{context.run_id}"
    for name, png in report.figures.items():
        storage.put_bytes(f"{key}/figures/{name}", png)
    markdown_uri = storage.put_bytes(f"{key}/report.md", report.markdown.encode("utf-8"))
    html_uri = storage.put_bytes(f"{key}/report.html", report.html.encode("utf-8"))
    macro_auc = float(evaluation_metrics.filter(pl.col("query") == "macro").item(0, "auc"))
    context.log.info("Wrote the evaluation report to %s", html_uri)

    row = pl.DataFrame({"report_html": [html_uri], "report_markdown": [markdown_uri], "queries": [len(queries)],
                        "macro_auc": [macro_auc]})
    return dg.Output(
        row,
        metadata={
            "report_html": dg.MetadataValue.path(html_uri),
            "report_markdown": dg.MetadataValue.path(markdown_uri),
            "macro_auc": dg.MetadataValue.float(macro_auc),
            "forest_plot": dg.MetadataValue.md(markdown_image(report.figures["auc_forest.png"], "AUC forest plot")),
        },
    )


def _bootstrap_settings(context: dg.AssetExecutionContext) -> dict:
    """Return the bootstrap settings recorded on the latest evaluation_metrics materialization."""
    event = context.instance.get_latest_materialization_event(dg.AssetKey("evaluation_metrics"))
    if event is None or event.asset_materialization is None:
        return {}
    value = event.asset_materialization.metadata.get("bootstrap")
    return dict(value.value) if value is not None else {}
