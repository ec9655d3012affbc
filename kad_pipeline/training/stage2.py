"""Stage-2 training of KAD: image encoder plus DQN, with resume and DDP.

The inputs are a training bundle (``write_training_bundle``) and an image cache. The bundle contains
per-image labels and the frozen knowledge encoder's embeddings of the queries and of each
report's entity text, so training runs no text encoder. Three equally weighted losses: DQN
cross-entropy on image tokens, DQN cross-entropy with the entity-text embedding as the only
memory token, and an image-text contrastive loss on pooled image features.

Resume: a checkpoint (every epoch, and every ``checkpoint_every_steps`` optimizer steps) stores
model, optimizer, scheduler, the sampler position (epoch, step in epoch) and RNG states. The
sample order is a function of (seed, epoch) and each augmentation a function of (seed, epoch,
image), so a resumed run replays exactly the batches the killed run had not finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl
import safetensors.torch
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from kad_pipeline.images.cache import ImageCache
from kad_pipeline.models.checkpoints import (
    capture_rng_state,
    load_training_state,
    restore_rng_state,
    save_kad_checkpoint,
    save_training_state,
)
from kad_pipeline.models.kad import (
    KADConfig,
    KADModel,
    dqn_classification_loss,
    image_text_contrastive_loss,
)
from kad_pipeline.training.distributed import (
    DistributedContext,
    all_gather_no_grad,
    all_gather_with_grad,
    barrier,
    mean_across_ranks,
)
from kad_pipeline.training.schedule import warmup_cosine_schedule

logger = logging.getLogger(__name__)

PAIRS_FILE = "pairs.parquet"
EMBEDDINGS_FILE = "embeddings.safetensors"
BUNDLE_META_FILE = "bundle.json"
LATEST_FILE = "latest.json"
METRICS_FILE = "metrics.jsonl"

Reporter = Callable[[str, dict[str, Any]], None]


@dataclass
class Stage2Config:
    """Everything a stage-2 run needs; read from the JSON file given to the entrypoint."""

    bundle_dir: str  # folder written by write_training_bundle
    cache_dir: str  # ImageCache folder
    output_dir: str  # checkpoints/, final/ and metrics.jsonl go here
    model: dict[str, Any] = field(default_factory=dict)  # KADConfig fields; query_names come from the bundle
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps in total
    global_batch_size: int = 32  # images per optimizer step over all ranks and accumulation steps
    grad_accum_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.02
    warmup_steps: int = 100  # capped at a tenth of the total steps
    min_lr_ratio: float = 0.01
    clip_grad_norm: float | None = 1.0  # None disables clipping
    seed: int = 42
    num_workers: int = 0  # DataLoader worker processes per rank
    device: str = "auto"  # auto|cpu|cuda
    precision: str = "auto"  # auto|fp32|bf16; auto is bf16 autocast on CUDA and AMX CPUs, else fp32
    channels_last: bool = True  # NHWC layout: faster on CUDA, and on a 2-core CPU in benchmarks/train_throughput.py
    compile: bool = False  # torch.compile the model
    num_threads: int | None = None  # torch intra-op threads per process; None keeps the torch default
    checkpoint_every_steps: int = 0  # 0: checkpoints at epoch ends only
    keep_checkpoints: int = 2
    resume: bool = True  # continue from output_dir/checkpoints when one exists
    crop_scale_min: float = 0.5  # random resized crop keeps at least this area fraction; 1.0 disables
    horizontal_flip: bool = False
    contrastive_negatives: str = "global"  # global: gather features over ranks; local: per rank micro-batch
    log_every_steps: int = 10

    @classmethod
    def from_json(cls, path: str | Path) -> Stage2Config:
        values = json.loads(Path(path).read_text())
        known = {item.name for item in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown stage-2 config fields {unknown} in {path}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- Training bundle ------------------------------------------------------------------------

def write_training_bundle(
    bundle_dir: str | Path,
    pairs: pl.DataFrame,
    query_names: list[str],
    query_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
) -> Path:
    """Write the per-image training table and the frozen text embeddings stage 2 reads.

    ``pairs`` has image_id, split, text_index (row of ``text_embeddings``) and one Int8 label
    column per query name (1 present, 0 absent, -1 uncertain, null not mentioned, which
    becomes 0 here).
    """
    missing = [name for name in ("image_id", "split", "text_index", *query_names) if name not in pairs.columns]
    if missing:
        raise ValueError(f"training pairs lack columns {missing}")
    if query_embeddings.shape[0] != len(query_names):
        raise ValueError(f"got {query_embeddings.shape[0]} query embeddings for {len(query_names)} query names; expected one per name")
    if query_embeddings.shape[1] != text_embeddings.shape[1]:
        raise ValueError(f"query embedding width {query_embeddings.shape[1]} differs from text embedding width {text_embeddings.shape[1]}; embed both with one encoder")
    max_index = pairs["text_index"].max()
    if max_index is not None and max_index >= text_embeddings.shape[0]:
        raise ValueError(f"invalid text_index {max_index}: only {text_embeddings.shape[0]} text embeddings were given")

    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    table = pairs.select(
        "image_id", "split", pl.col("text_index").cast(pl.Int64),
        pl.concat_list([pl.col(name).fill_null(0).cast(pl.Int8) for name in query_names]).alias("labels"),
    )
    table.write_parquet(bundle_dir / PAIRS_FILE)
    safetensors.torch.save_file(
        {"query_embeddings": query_embeddings.detach().float().contiguous(),
         "text_embeddings": text_embeddings.detach().float().contiguous()},
        str(bundle_dir / EMBEDDINGS_FILE),
    )
    (bundle_dir / BUNDLE_META_FILE).write_text(json.dumps({"query_names": list(query_names)}))
    return bundle_dir


def entity_text_of(labels: dict[str, int | None], query_names: list[str]) -> str:
    """Return a report's entity text: its present queries joined by ", ", or "normal" when none is present.

    NOTE: the KAD reference code embeds the entities extracted from the report text. A label
    matrix keeps only the query entities, so this text is built from those.
    """
    present = [name for name in query_names if labels.get(name) == 1]
    return ", ".join(present) if present else "normal"


def build_training_pairs(manifest: pl.DataFrame, labels: pl.DataFrame, cached_ids: list[str]) -> tuple[pl.DataFrame, dict[str, int]]:
    """Join the image manifest with the label matrix and add each report's entity text.

    Keeps images whose pixels are cached and whose report has a label row. Returns the pairs
    (image_id, report_id, split, entity_text, one Int8 column per query) and the drop counts.
    """
    query_names = [name for name in labels.columns if name != "report_id"]
    cached = manifest.filter(pl.col("image_id").is_in(cached_ids))
    joined = cached.select("image_id", "report_id", "split").join(labels, on="report_id", how="inner")
    texts = [entity_text_of(row, query_names) for row in joined.select(query_names).iter_rows(named=True)]
    pairs = joined.with_columns(pl.Series("entity_text", texts, dtype=pl.String)).select(
        "image_id", "report_id", "split", "entity_text", *query_names)
    dropped = {"not_cached": manifest.height - cached.height, "no_labels": cached.height - joined.height}
    return pairs, dropped


def write_bundle_from_pairs(
    bundle_dir: str | Path, pairs: pl.DataFrame, query_names: list[str], encode: Callable[[list[str]], torch.Tensor]
) -> Path:
    """Embed the query names and the distinct entity texts with ``encode`` and write the bundle."""
    texts = sorted(set(pairs["entity_text"].to_list()))
    text_index = {text: number for number, text in enumerate(texts)}
    pairs = pairs.with_columns(pl.col("entity_text").replace_strict(text_index, return_dtype=pl.Int64).alias("text_index"))
    return write_training_bundle(bundle_dir, pairs, query_names, encode(list(query_names)), encode(texts))


@dataclass
class TrainingBundle:
    pairs: pl.DataFrame
    query_names: list[str]
    query_embeddings: torch.Tensor  # (Q, d)
    text_embeddings: torch.Tensor  # (T, d)


def read_training_bundle(bundle_dir: str | Path) -> TrainingBundle:
    bundle_dir = Path(bundle_dir)
    for name in (PAIRS_FILE, EMBEDDINGS_FILE, BUNDLE_META_FILE):
        if not (bundle_dir / name).is_file():
            raise FileNotFoundError(f"training bundle file not found: {bundle_dir / name}")
    tensors = safetensors.torch.load_file(str(bundle_dir / EMBEDDINGS_FILE))
    meta = json.loads((bundle_dir / BUNDLE_META_FILE).read_text())
    return TrainingBundle(pl.read_parquet(bundle_dir / PAIRS_FILE), meta["query_names"],
                          tensors["query_embeddings"], tensors["text_embeddings"])


# --- Data -------------------------------------------------------------------------------------

class CachedImageDataset(Dataset):
    """Images from an ImageCache as uint8 tensors (1, S, S), augmented per (seed, epoch, index).

    Items are requested as (index, epoch) pairs. The random resized crop and flip of an item
    depend only on the seed, the epoch and the index, never on which worker or process reads it.
    """

    def __init__(self, cache: ImageCache, positions: np.ndarray, image_size: int, augment: bool,
                 crop_scale_min: float, horizontal_flip: bool, seed: int):
        self.cache = cache
        self.positions = positions
        self.image_size = image_size
        self.augment = augment
        self.crop_scale_min = crop_scale_min
        self.horizontal_flip = horizontal_flip
        self.seed = seed

    def __len__(self) -> int:
        return len(self.positions)

    def _crop_box(self, generator: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
        area = height * width
        for _ in range(10):
            target = area * generator.uniform(self.crop_scale_min, 1.0)
            ratio = math.exp(generator.uniform(math.log(3 / 4), math.log(4 / 3)))
            crop_w = int(round(math.sqrt(target * ratio)))
            crop_h = int(round(math.sqrt(target / ratio)))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = int(generator.integers(0, height - crop_h + 1))
                left = int(generator.integers(0, width - crop_w + 1))
                return top, left, crop_h, crop_w
        return 0, 0, height, width

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = item
        pixels = self.cache.get_by_position(int(self.positions[index]))
        flip = False
        if self.augment and (self.crop_scale_min < 1.0 or self.horizontal_flip):
            generator = np.random.default_rng([self.seed, epoch, index])
            if self.crop_scale_min < 1.0:
                top, left, crop_h, crop_w = self._crop_box(generator, *pixels.shape)
                pixels = pixels[top:top + crop_h, left:left + crop_w]
            flip = self.horizontal_flip and bool(generator.integers(0, 2))
        tensor = torch.from_numpy(np.array(pixels, copy=True)).unsqueeze(0)  # (1, h, w) uint8; a copy, since cache maps are read-only
        if tensor.shape[-2:] != (self.image_size, self.image_size):
            resized = F.interpolate(tensor.unsqueeze(0).float(), size=(self.image_size, self.image_size),
                                    mode="bilinear", align_corners=False, antialias=True)
            tensor = resized.squeeze(0).round_().clamp_(0, 255).to(torch.uint8)
        if flip:
            tensor = tensor.flip(-1)
        return tensor, index


class ResumableBatchSampler:
    """Yields this rank's micro-batches of (index, epoch) for one epoch, from a given step on.

    Every optimizer step takes the next ``global_batch`` indices of a permutation seeded by
    (seed, epoch) and splits them into ``accum`` micro-steps of ``world_size`` slices. Rank r in
    micro-step m gets slice ``m * world_size + r``. One process with accumulation A and P
    processes with accumulation A / P therefore see the same micro-batches, so batch-norm
    statistics line up. The last incomplete global batch of an epoch is dropped.
    """

    def __init__(self, dataset_size: int, global_batch: int, accum: int, context: DistributedContext,
                 seed: int, epoch: int, start_step: int, shuffle: bool = True):
        slices = accum * context.world_size
        if global_batch % slices != 0:
            raise ValueError(f"global_batch_size {global_batch} is not divisible by grad_accum_steps x world_size = {slices}")
        self.micro = global_batch // slices
        self.global_batch = global_batch
        self.accum = accum
        self.context = context
        self.epoch = epoch
        self.start_step = start_step
        self.steps = dataset_size // global_batch
        if shuffle:
            generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
            self.order = torch.randperm(dataset_size, generator=generator).tolist()
        else:
            self.order = list(range(dataset_size))

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step) * self.accum

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            chunk = self.order[step * self.global_batch:(step + 1) * self.global_batch]
            for micro_step in range(self.accum):
                offset = (micro_step * self.context.world_size + self.context.rank) * self.micro
                yield [(index, self.epoch) for index in chunk[offset:offset + self.micro]]


# --- Training -----------------------------------------------------------------------------------

def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_has_amx_bf16() -> bool:
    """Return whether this Linux CPU lists the ``amx_bf16`` flag (Intel AMX bf16 matrix units)."""
    try:
        with open("/proc/cpuinfo") as stream:
            return any(line.startswith("flags") and " amx_bf16" in line for line in stream)
    except OSError:
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map "auto" to bf16 autocast on CUDA and on CPUs with AMX bf16, else fp32.

    On a 2-core AMX CPU, bf16 with channels-last more than doubled the ResNet-50 step
    throughput over fp32 (benchmarks/train_throughput.py). Without AMX, CPU bf16 is emulated
    and usually slower, so auto stays fp32 there.
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"invalid precision {precision!r}; expected 'auto', 'fp32' or 'bf16'")
    if precision == "auto":
        return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_amx_bf16()) else "fp32"
    return precision


def compute_losses(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    text_embeddings: torch.Tensor,
    text_ids: torch.Tensor,
    query_embeddings: torch.Tensor,
    config: KADConfig,
    contrastive_negatives: str,
    context: DistributedContext,
) -> dict[str, torch.Tensor]:
    """Return the three stage-2 losses and their equally weighted sum (key ``loss``)."""
    image_logits, pooled, text_logits = model(images, query_embeddings, text_embeddings)
    loss_image = dqn_classification_loss(image_logits, labels, config.uncertain_policy)
    loss_text = dqn_classification_loss(text_logits, labels, config.uncertain_policy)
    if contrastive_negatives == "global":
        pooled = all_gather_with_grad(pooled, context)
        text_embeddings = all_gather_no_grad(text_embeddings, context)
        text_ids = all_gather_no_grad(text_ids, context)
    loss_contrastive = image_text_contrastive_loss(pooled, text_embeddings, text_ids, config.temperature)
    total = loss_image + loss_text + loss_contrastive
    return {"loss": total, "loss_image": loss_image, "loss_text": loss_text, "loss_contrastive": loss_contrastive}


def _macro_auc(labels: np.ndarray, probs: np.ndarray, query_names: list[str]) -> tuple[float | None, dict[str, float]]:
    from sklearn.metrics import roc_auc_score

    per_query = {}
    for column, name in enumerate(query_names):
        positives = labels[:, column] == 1
        if 0 < positives.sum() < len(positives):
            per_query[name] = float(roc_auc_score(positives, probs[:, column]))
    macro = float(np.mean(list(per_query.values()))) if per_query else None
    return macro, per_query


@torch.no_grad()
def evaluate(model: KADModel, loader: DataLoader, labels: torch.Tensor, query_embeddings: torch.Tensor,
             query_names: list[str], device: torch.device, precision: str) -> dict[str, Any]:
    """Score a split: mean image-token DQN loss and macro AUC over queries with both classes.

    Uncertain labels count as negatives here, whatever the training policy.
    """
    model.eval()
    all_probs, all_labels, losses = [], [], []
    for pixels, indices in loader:
        images = model.normalize(pixels.to(device))
        batch_labels = labels[indices].to(device)
        with _autocast(device, precision):
            logits, _, _ = model(images, query_embeddings)
        losses.append(float(dqn_classification_loss(logits, batch_labels, "negative")) * len(indices))
        all_probs.append(logits.float().softmax(-1)[..., 1].cpu())
        all_labels.append(batch_labels.cpu())
    model.train()
    if not all_probs:
        return {"images": 0}
    probs = torch.cat(all_probs).numpy()
    label_array = torch.cat(all_labels).numpy()
    macro, per_query = _macro_auc(label_array, probs, query_names)
    return {"images": len(probs), "loss_image": sum(losses) / len(probs), "macro_auc": macro, "auc": per_query}


def _checkpoint_root(config: Stage2Config) -> Path:
    return Path(config.output_dir) / "checkpoints"


def _latest_checkpoint(config: Stage2Config) -> Path | None:
    pointer = _checkpoint_root(config) / LATEST_FILE
    if not pointer.is_file():
        return None
    folder = _checkpoint_root(config) / json.loads(pointer.read_text())["folder"]
    return folder if folder.is_dir() else None


def _write_checkpoint(config: Stage2Config, model: KADModel, optimizer, scheduler, position: dict[str, int],
                      query_embeddings: torch.Tensor) -> Path:
    root = _checkpoint_root(config)
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"step-{position['global_step']:08d}"
    save_kad_checkpoint(model, folder, query_embeddings, training=config.to_dict())
    save_training_state(folder, {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "position": position,
        "rng": capture_rng_state(),
    })
    handle, name = tempfile.mkstemp(dir=root, prefix=".latest.", suffix=".tmp")
    with os.fdopen(handle, "w") as stream:
        json.dump({"folder": folder.name, **position}, stream)
    os.replace(name, root / LATEST_FILE)

    older = sorted(path for path in root.glob("step-*") if path.is_dir() and path != folder)
    for stale in older[:max(0, len(older) - (config.keep_checkpoints - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return folder


def train_stage2(config: Stage2Config, context: DistributedContext, report: Reporter | None = None) -> dict[str, Any]:
    """Train (or resume) stage 2 and write ``output_dir/final``; return a summary of the run."""
    report = report or (lambda event, payload: None)
    if config.contrastive_negatives not in ("global", "local"):
        raise ValueError(f"invalid contrastive_negatives {config.contrastive_negatives!r}; expected 'global' or 'local'")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = context.device
    precision = resolve_precision(config.precision, device)
    channels_last = config.channels_last

    bundle = read_training_bundle(config.bundle_dir)
    cache = ImageCache(config.cache_dir)
    model_config = KADConfig.from_dict({**config.model, "query_names": bundle.query_names,
                                        "embed_dim": int(bundle.query_embeddings.shape[1])})
    pairs = bundle.pairs.filter(pl.col("image_id").is_in(cache.image_ids))
    if pairs.height < bundle.pairs.height:
        logger.warning("%d training pairs have no cached image and are skipped", bundle.pairs.height - pairs.height)
    train_pairs = pairs.filter(pl.col("split") == "train")
    valid_pairs = pairs.filter(pl.col("split") == "valid")
    if train_pairs.height < config.global_batch_size:
        raise ValueError(f"{train_pairs.height} training images are fewer than one global batch of {config.global_batch_size}")

    def tensors_of(frame: pl.DataFrame):
        positions = np.array([cache.position(image_id) for image_id in frame["image_id"].to_list()], dtype=np.int64)
        labels = torch.tensor(np.array(frame["labels"].to_list(), dtype=np.int8).reshape(frame.height, -1))
        return positions, labels, torch.tensor(frame["text_index"].to_numpy())

    train_positions, train_labels, train_text_index = tensors_of(train_pairs)
    valid_positions, valid_labels, _ = tensors_of(valid_pairs)
    query_embeddings = bundle.query_embeddings.to(device)
    text_embeddings = bundle.text_embeddings.to(device)

    torch.manual_seed(config.seed)
    model = KADModel(model_config).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    steps_per_epoch = train_pairs.height // config.global_batch_size
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    scheduler = warmup_cosine_schedule(optimizer, min(config.warmup_steps, total_steps // 10), max(1, total_steps),
                                       config.min_lr_ratio)

    position = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    latest = _latest_checkpoint(config) if config.resume else None
    if latest is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(latest / "model.safetensors"), device=str(device)))
        state = load_training_state(latest)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        position = dict(state["position"])
        logger.info("resumed from %s at epoch %d step %d (global step %d)", latest, position["epoch"],
                    position["step_in_epoch"], position["global_step"])
        report("resumed", {"checkpoint": str(latest), **position})

    train_model: torch.nn.Module = model
    if context.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        train_model = torch.compile(train_model)

    train_data = CachedImageDataset(cache, train_positions, model_config.image_size, True,
                                    config.crop_scale_min, config.horizontal_flip, config.seed)
    valid_data = CachedImageDataset(cache, valid_positions, model_config.image_size, False, 1.0, False, config.seed)
    loader_options = {"num_workers": config.num_workers, "pin_memory": device.type == "cuda",
                      "persistent_workers": False}
    if config.num_workers > 0:
        loader_options["prefetch_factor"] = 4

    metrics_path = Path(config.output_dir) / METRICS_FILE
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    logger.info("stage 2: %d train / %d valid images, %d queries, %d steps per epoch, %d total steps, "
                "world size %d, device %s, precision %s", train_pairs.height, valid_pairs.height,
                len(bundle.query_names), steps_per_epoch, total_steps, context.world_size, device, precision)
    report("start", {"train_images": train_pairs.height, "valid_images": valid_pairs.height,
                     "total_steps": total_steps, "world_size": context.world_size})

    last_losses: dict[str, float] = {}
    validation: dict[str, Any] = {}
    images_seen, window_start = 0, time.perf_counter()
    run_start = time.perf_counter()
    model.train()
    finished = position["global_step"] >= total_steps

    for epoch in range(position["epoch"], config.epochs):
        if finished:
            break
        start_step = position["step_in_epoch"] if epoch == position["epoch"] else 0
        sampler = ResumableBatchSampler(len(train_data), config.global_batch_size, config.grad_accum_steps, context,
                                        config.seed, epoch, start_step)
        batches = iter(DataLoader(train_data, batch_sampler=sampler, **loader_options))
        for step_in_epoch in range(start_step, steps_per_epoch):
            global_step = position["global_step"]
            # Dropout masks depend on (seed, step, rank) only, so a resumed run repeats them.
            torch.manual_seed(config.seed * 1_000_003 + global_step * 1_009 + context.rank)
            optimizer.zero_grad(set_to_none=True)
            step_losses = torch.zeros(4, device=device)
            for micro_step in range(config.grad_accum_steps):
                pixels, indices = next(batches)
                images = model.normalize(pixels.to(device, non_blocking=True))
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                sync = micro_step == config.grad_accum_steps - 1 or not context.enabled
                with (contextlib.nullcontext() if sync else train_model.no_sync()):
                    with _autocast(device, precision):
                        losses = compute_losses(
                            train_model, images, train_labels[indices].to(device),
                            text_embeddings[train_text_index[indices].to(device)], train_text_index[indices].to(device),
                            query_embeddings, model_config, config.contrastive_negatives, context)
                    (losses["loss"] / config.grad_accum_steps).backward()
                step_losses += torch.stack([losses[key].detach().float() for key in
                                            ("loss", "loss_image", "loss_text", "loss_contrastive")])
            if config.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
            optimizer.step()
            scheduler.step()

            position = {"epoch": epoch, "step_in_epoch": step_in_epoch + 1, "global_step": global_step + 1}
            step_losses = mean_across_ranks(step_losses / config.grad_accum_steps, context).tolist()
            last_losses = dict(zip(("loss", "loss_image", "loss_text", "loss_contrastive"), step_losses))
            images_seen += config.global_batch_size
            if context.is_main:
                record = {"step": position["global_step"], "epoch": epoch, **last_losses,
                          "lr": scheduler.get_last_lr()[0]}
                with open(metrics_path, "a") as stream:
                    stream.write(json.dumps(record) + "\n")
                if position["global_step"] % config.log_every_steps == 0 or position["global_step"] == total_steps:
                    elapsed = time.perf_counter() - window_start
                    record["images_per_second"] = images_seen / elapsed if elapsed > 0 else 0.0
                    images_seen, window_start = 0, time.perf_counter()
                    logger.info("step %d epoch %d loss %.4f (image %.4f, text %.4f, contrastive %.4f) lr %.2e %.1f images/s",
                                record["step"], epoch, record["loss"], record["loss_image"], record["loss_text"],
                                record["loss_contrastive"], record["lr"], record["images_per_second"])
                    report("step", record)

            finished = position["global_step"] >= total_steps
            at_step_checkpoint = config.checkpoint_every_steps and position["global_step"] % config.checkpoint_every_steps == 0
            if at_step_checkpoint and not finished and position["step_in_epoch"] < steps_per_epoch:
                if context.is_main:
                    folder = _write_checkpoint(config, model, optimizer, scheduler, position, bundle.query_embeddings)
                    logger.info("checkpoint saved step=%d path=%s", position["global_step"], folder)
                    report("checkpoint", {"step": position["global_step"], "path": str(folder)})
                barrier(context)
            if finished:
                break

        if position["step_in_epoch"] >= steps_per_epoch:
            position = {"epoch": epoch + 1, "step_in_epoch": 0, "global_step": position["global_step"]}
        if context.is_main:
            if valid_pairs.height:
                valid_loader = DataLoader(valid_data, batch_size=config.global_batch_size,
                                          sampler=[(index, epoch) for index in range(len(valid_data))],
                                          **loader_options)
                validation = evaluate(model, valid_loader, valid_labels, query_embeddings, bundle.query_names,
                                      device, precision)
                logger.info("epoch %d validation: %d images, loss %.4f, macro AUC %s", epoch, validation["images"],
                            validation["loss_image"], validation["macro_auc"])
                report("validation", {"epoch": epoch, **{k: v for k, v in validation.items() if k != "auc"}})
            folder = _write_checkpoint(config, model, optimizer, scheduler, position, bundle.query_embeddings)
            logger.info("checkpoint saved step=%d path=%s", position["global_step"], folder)
            report("checkpoint", {"step": position["global_step"], "path": str(folder)})
        barrier(context)

    final_dir = Path(config.output_dir) / "final"
    summary = {"final_losses": last_losses, "validation": validation, "global_step": position["global_step"],
               "seconds": time.perf_counter() - run_start, "checkpoint_dir": str(final_dir),
               "precision": precision, "world_size": context.world_size}
    if context.is_main:
        save_kad_checkpoint(model, final_dir, bundle.query_embeddings,
                            training={**config.to_dict(), "summary": {k: v for k, v in summary.items() if k != "checkpoint_dir"}})
        logger.info("final checkpoint written to %s", final_dir)
        report("final", summary)
    barrier(context)
    return summary
