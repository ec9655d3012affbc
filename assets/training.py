"""Training: the decoded-image cache, image-label pairs, and the stage-2 KAD model."""

import hashlib
import json
import os
import shutil
from pathlib import Path

from typing import Any

import dagster as dg
import polars as pl
from pydantic import Field

from assets.metadata import markdown_table
from resources.compute import ComputeResource
from resources.storage import ArtifactStorageResource

GROUP = "training"
CACHE_CODE_VERSION = "image-cache-v1"
PAIRS_CODE_VERSION = "training-pairs-v1"
MODEL_CODE_VERSION = "kad-model-v1"
REPO_ROOT = Path(__file__).resolve().parents[1]


class ImageCacheConfig(dg.Config):
    """Settings of the decoded-image cache."""

    image_size: int = Field(default=224, description="Side in pixels of the cached square images (at least the training image_size).")
    shard_size: int = Field(default=4096, description="Images per on-disk shard.")


@dg.asset(group_name=GROUP, code_version=CACHE_CODE_VERSION, kinds={"numpy", "polars", "parquet"})
def image_cache(
    context: dg.AssetExecutionContext,
    config: ImageCacheConfig,
    storage: ArtifactStorageResource,
    compute: ComputeResource,
    image_manifest: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    """Decode and resize every manifest image once into memory-mapped uint8 shards.

    A rebuild decodes only images whose content hash or size changed. One row per image:
    image_id, status ("cached" or "quarantined"), reason, content_sha256, cache_dir.
    Unreadable, truncated or missing images are quarantined with a reason and the run goes on.
    """
    from kad_pipeline.images.cache import build_image_cache

    store = storage.store()
    cache_key = f"caches/images/{config.image_size}px"
    local_cache = store.local_path(cache_key)
    cache_dir = local_cache if local_cache is not None else Path(compute.work_dir) / cache_key
    manifest = _localise_paths(image_manifest, store, Path(compute.work_dir) / "images")

    result = build_image_cache(manifest.select("image_id", "path"), cache_dir, config.image_size,
                               shard_size=config.shard_size, num_workers=compute.num_workers)
    context.log.info("Image cache %s: %s", cache_dir, result.stats)
    for row in result.quarantine.head(20).iter_rows(named=True):
        context.log.warning("Quarantined image %s: %s (%s)", row["image_id"], row["reason"], row["detail"])

    cached = result.cache.index.select(
        "image_id", pl.lit("cached").alias("status"), pl.lit(None, dtype=pl.String).alias("reason"), "content_sha256")
    quarantined = result.quarantine.select(
        "image_id", pl.lit("quarantined").alias("status"), "reason", pl.lit(None, dtype=pl.String).alias("content_sha256"))
    table = pl.concat([cached, quarantined]).with_columns(
        pl.lit(str(cache_dir)).alias("cache_dir"), pl.lit(config.image_size, dtype=pl.Int32).alias("image_size"))
    reasons = dict(result.quarantine.group_by("reason").len().rows()) if result.quarantine.height else {}
    return dg.Output(table, metadata={
        "cache_dir": dg.MetadataValue.path(str(cache_dir)),
        "image_size": config.image_size,
        "cached": result.cache.index.height,
        "decoded_this_run": result.stats["decoded"],
        "reused": result.stats["reused"],
        "quarantined": result.quarantine.height,
        "quarantine_reasons": dg.MetadataValue.json(reasons),
    })


def _localise_paths(manifest: pl.DataFrame, store, staging: Path) -> pl.DataFrame:
    """Download images whose path is an object-store URI, so the decoder reads local files."""
    paths = []
    for image_id, path in zip(manifest["image_id"].to_list(), manifest["path"].to_list()):
        if "://" in path and not path.startswith("file://"):
            local = staging / f"{image_id}{Path(path).suffix}"
            if not local.is_file():
                store.get_file(path, local)
            path = str(local)
        elif path.startswith("file://"):
            path = path[len("file://"):]
        paths.append(path)
    return manifest.with_columns(pl.Series("path", paths, dtype=pl.String))


@dg.asset(group_name=GROUP, code_version=PAIRS_CODE_VERSION, kinds={"polars", "parquet"})
def training_pairs(
    context: dg.AssetExecutionContext,
    image_manifest: pl.DataFrame,
    image_cache: pl.DataFrame,
    report_labels: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    """Join cached images with their report's label row and entity text.

    One row per image: image_id, report_id, split, entity_text (the present query names) and
    one Int8 column per query (1 present, 0 absent, -1 uncertain, null not mentioned).
    """
    from kad_pipeline.training.stage2 import build_training_pairs

    cached_ids = image_cache.filter(pl.col("status") == "cached")["image_id"].to_list()
    pairs, dropped = build_training_pairs(image_manifest, report_labels, cached_ids)
    context.log.info("Training pairs: %d; dropped %s", pairs.height, dropped)
    queries = [name for name in report_labels.columns if name != "report_id"]
    positives = pairs.group_by("split").agg([(pl.col(name) == 1).sum().alias(name) for name in queries]).sort("split")
    return dg.Output(pairs, metadata={
        "pairs": pairs.height,
        "splits": dg.MetadataValue.json(dict(pairs.group_by("split").len().rows())),
        "dropped": dg.MetadataValue.json(dropped),
        "positives_per_split": dg.MetadataValue.md(markdown_table(positives)),
    })


class KADModelConfig(dg.Config):
    """Stage-2 settings. The defaults follow the KAD paper: ResNet-50 cut after layer3 at 224 px.

    Demo deviation: a 2-core CPU cannot train ResNet-50 in minutes, so the offline demo sets
    backbone="resnet18", image_size=128 (with the image_cache image_size also 128), epochs=3,
    global_batch_size=32, lr=5e-4, warmup_steps=20 and crop_scale_min=0.8. Every backbone here
    starts from random weights unless weights_path names a local file.
    """

    backbone: str = Field(default="resnet50", description="resnet18|resnet34|resnet50|resnet101|vit_b_16.")
    image_size: int = Field(default=224, description="Network input side in pixels; at most the cache image_size.")
    weights_path: str | None = Field(default=None, description="Local torchvision-format backbone weights; never downloaded.")
    queries: list[str] = Field(default_factory=list, description="Training queries; empty means every label column.")
    held_out_queries: list[str] = Field(default_factory=list, description="Queries left out of training, for zero-shot tests.")
    uncertain_policy: str = Field(default="negative", description="'negative' (KAD default) or 'ignore' for -1 labels.")
    epochs: int = Field(default=10, description="Passes over the training split.")
    max_steps: int | None = Field(default=None, description="Stop after this many optimizer steps.")
    global_batch_size: int = Field(default=32, description="Images per optimizer step over all processes.")
    grad_accum_steps: int = Field(default=1, description="Micro-steps per optimizer step.")
    lr: float = Field(default=1e-4, description="Peak AdamW learning rate.")
    weight_decay: float = Field(default=0.02, description="AdamW weight decay of matrices.")
    warmup_steps: int = Field(default=100, description="Linear warmup steps (capped at a tenth of the run).")
    crop_scale_min: float = Field(default=0.5, description="Random resized crop keeps at least this area fraction; 1.0 disables.")
    checkpoint_every_steps: int = Field(default=200, description="Resumable checkpoint interval in optimizer steps (0: epoch ends only).")
    seed: int = Field(default=42, description="Seed of initialization, sample order, augmentation and dropout.")


def _fingerprint(*parts: object) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


@dg.asset(
    group_name=GROUP,
    code_version=MODEL_CODE_VERSION,
    kinds={"pytorch", "polars", "parquet"},
    pool="gpu",
)
def kad_model(
    context: dg.AssetExecutionContext,
    config: KADModelConfig,
    storage: ArtifactStorageResource,
    compute: ComputeResource,
    pipes_subprocess_client: dg.PipesSubprocessClient,
    stage2_pod: dg.ResourceParam[Any],
    training_pairs: pl.DataFrame,
    image_cache: pl.DataFrame,
    knowledge_encoder: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    """Stage 2: train the image encoder and Disease Query Network in a Dagster Pipes child process.

    Queries and entity texts are embedded once by the frozen stage-1 knowledge encoder. The
    child streams loss and throughput back as logs; a child that dies fails this run. A rerun
    with the same inputs and settings resumes from the child's last checkpoint. The table is a
    one-row pointer: checkpoint_uri, config, final losses and validation macro AUC.
    """
    from kad_pipeline.models.text_encoder import load_knowledge_encoder
    from kad_pipeline.training.stage2 import Stage2Config, write_bundle_from_pairs

    cached = image_cache.filter(pl.col("status") == "cached")
    if cached.height == 0:
        raise ValueError("the image cache is empty; materialize image_cache with a non-empty manifest")
    cache_dir = cached["cache_dir"][0]
    cache_size = int(cached["image_size"][0])
    if config.image_size > cache_size:
        raise ValueError(f"kad_model image_size {config.image_size} exceeds the cache image_size {cache_size}; rebuild the cache larger")

    label_columns = [name for name in training_pairs.columns if name not in ("image_id", "report_id", "split", "entity_text")]
    queries = [name for name in (config.queries or label_columns) if name not in set(config.held_out_queries)]
    unknown = sorted(set(queries) - set(label_columns))
    if unknown:
        raise ValueError(f"queries {unknown} have no label column in training_pairs")
    context.log.info("Training %d queries; held out: %s", len(queries), config.held_out_queries or "none")

    settings = config.model_dump()
    encoder_uri = knowledge_encoder["checkpoint_uri"][0]
    run_root = Path(compute.work_dir) / "kad_model" / _fingerprint(
        settings, encoder_uri, str(training_pairs.hash_rows(seed=0).sum()), cache_dir)
    bundle_dir = run_root / "bundle"
    if not (bundle_dir / "bundle.json").is_file():
        encoder = load_knowledge_encoder(storage.get_dir(encoder_uri))
        write_bundle_from_pairs(bundle_dir, training_pairs.select("image_id", "split", "entity_text", *queries),
                                queries, encoder.encode)
        context.log.info("Embedded %d queries and the entity texts with %s", len(queries), encoder_uri)

    stage2 = Stage2Config(
        bundle_dir=str(bundle_dir), cache_dir=cache_dir, output_dir=str(run_root / "run"),
        model={"backbone": config.backbone, "image_size": config.image_size, "weights_path": config.weights_path,
               "uncertain_policy": config.uncertain_policy},
        epochs=config.epochs, max_steps=config.max_steps, global_batch_size=config.global_batch_size,
        grad_accum_steps=config.grad_accum_steps, lr=config.lr, weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps, crop_scale_min=config.crop_scale_min, seed=config.seed,
        checkpoint_every_steps=config.checkpoint_every_steps, device=compute.device, precision=compute.precision,
        num_workers=compute.num_workers, num_threads=compute.num_threads,
    )
    config_path = run_root / "stage2_config.json"
    config_path.write_text(json.dumps(stage2.to_dict(), indent=2))

    if stage2_pod is not None:
        # Production: a GPU pod runs torchrun over the same entry point. compute.work_dir must
        # be the shared scratch volume, so the pod reads the bundle and writes the checkpoint
        # where this step can upload it. NOTE: this branch has not run against a cluster.
        invocation = stage2_pod.launch(context, "kad_pipeline.training.stage2_main", ["--config", str(config_path)])
    else:
        command = compute.launch_command("kad_pipeline.training.stage2_main", ["--config", str(config_path)])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        context.log.info("Launching stage 2: %s", " ".join(command))
        invocation = pipes_subprocess_client.run(context=context, command=command, env=env, cwd=str(REPO_ROOT))
    finals = [message for message in invocation.get_custom_messages() if isinstance(message, dict) and message.get("event") == "final"]
    if not finals:
        raise RuntimeError(f"stage 2 exited without reporting a final summary; see the logs under {run_root / 'run'}")
    summary = finals[-1]

    checkpoint_uri = storage.put_dir(run_root / "run" / "final", f"checkpoints/kad_model/{context.run_id}")
    losses = summary.get("final_losses", {})
    validation = summary.get("validation", {})
    table = pl.DataFrame({
        "checkpoint_uri": [checkpoint_uri],
        "config": [json.dumps(stage2.to_dict(), sort_keys=True)],
        "queries": [queries],
        "loss": [losses.get("loss")],
        "loss_image": [losses.get("loss_image")],
        "loss_text": [losses.get("loss_text")],
        "loss_contrastive": [losses.get("loss_contrastive")],
        "valid_macro_auc": [validation.get("macro_auc")],
        "steps": [summary.get("global_step")],
    })
    shutil.rmtree(run_root / "run" / "checkpoints", ignore_errors=True)
    return dg.Output(table, metadata={
        "checkpoint_uri": dg.MetadataValue.path(checkpoint_uri),
        "steps": summary.get("global_step"),
        "train_seconds": round(float(summary.get("seconds", 0.0)), 1),
        "final_losses": dg.MetadataValue.json(losses),
        "valid_macro_auc": validation.get("macro_auc"),
        "valid_auc_per_query": dg.MetadataValue.json(validation.get("auc", {})),
        "queries": len(queries),
        "held_out_queries": dg.MetadataValue.json(config.held_out_queries),
    })
