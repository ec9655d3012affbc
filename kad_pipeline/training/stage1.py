"""Stage-1 training of the knowledge encoder with a multi-positive contrastive loss.

Each batch contains text pairs labelled with concept ids. Embeddings of the first texts are
scored against embeddings of the second texts. Every pair of texts with the same concept id
counts as a positive. This is the knowledge encoder training of KAD (Zhang et al., Nature
Communications 2023).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from kad_pipeline.models.text_encoder import (
    KnowledgeEncoder,
    build_knowledge_encoder,
    load_knowledge_encoder,
    staging_dir,
)
from kad_pipeline.training.schedule import warmup_cosine_schedule

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last"
TRAINING_STATE_FILE = "training_state.pt"


def multi_positive_contrastive_loss(
    embeddings_a: torch.Tensor,
    embeddings_b: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor | float,
) -> torch.Tensor:
    """Return the symmetric multi-positive contrastive loss of two aligned embedding batches.

    logits = scale * A @ B.T (B, B). Row i's target distribution is uniform over the
    columns j with labels[j] == labels[i]. The loss is the cross-entropy against it,
    computed for rows (A to B) and for columns (B to A) and averaged. With distinct labels
    this equals the CLIP loss.
    """
    if embeddings_a.shape != embeddings_b.shape:
        raise ValueError(f"embedding shapes differ: {tuple(embeddings_a.shape)} and {tuple(embeddings_b.shape)}")
    if labels.shape != embeddings_a.shape[:1]:
        raise ValueError(f"expected {embeddings_a.shape[0]} labels, got shape {tuple(labels.shape)}")
    logits = scale * embeddings_a.float() @ embeddings_b.float().T  # (B, B)
    positives = (labels[:, None] == labels[None, :]).float()  # (B, B), symmetric
    targets = positives / positives.sum(dim=1, keepdim=True)
    loss_a_to_b = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_b_to_a = -(targets * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (loss_a_to_b + loss_b_to_a) / 2


@dataclass
class Stage1Config:
    """Stage-1 settings; `steps` overrides `epochs` when set."""

    base_model: str  # transformers model name or local folder
    pooling: str = "pooler"  # see KnowledgeEncoderConfig.pooling
    projection_dim: int | None = None
    projection_init: str = "kad"  # see KnowledgeEncoderConfig.projection_init
    max_length: int = 64  # tokens per text
    batch_size: int = 32  # text pairs per optimizer step
    epochs: int = 1
    steps: int | None = None  # total optimizer steps; None means epochs * batches per epoch
    lr: float = 2e-5  # encoder learning rate
    projection_lr: float = 1e-3  # learning rate of mlp_embed and logit_scale, which start untrained
    weight_decay: float = 0.01
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm
    seed: int = 0
    log_every: int = 10  # steps between loss and throughput log lines
    checkpoint_every: int | None = None  # extra checkpoint every N steps; one is always written per epoch
    device: str = "auto"  # "auto" picks CUDA when available
    local_files_only: bool = True  # never download the base model
    metadata: dict = field(default_factory=dict)  # copied into the checkpoint config (split settings)


@dataclass
class Stage1Result:
    model: KnowledgeEncoder
    checkpoint_dir: Path
    steps: int
    final_loss: float
    history: list[dict]
    wall_seconds: float
    pairs_per_second: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _parameter_groups(model: KnowledgeEncoder, config: Stage1Config) -> list[dict]:
    decay, no_decay, head = [], [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.startswith("mlp_embed") or name == "logit_scale":
            head.append(parameter)
        elif parameter.ndim < 2:
            no_decay.append(parameter)  # biases and LayerNorm weights
        else:
            decay.append(parameter)
    return [
        {"params": decay, "lr": config.lr, "weight_decay": config.weight_decay},
        {"params": no_decay, "lr": config.lr, "weight_decay": 0.0},
        {"params": head, "lr": config.projection_lr, "weight_decay": 0.0},
    ]


def _samples_fingerprint(samples: pl.DataFrame) -> str:
    # polars row hashes are stable for one polars version, which is all that resuming needs.
    digest = samples.select("text_a", "text_b", "concept_id").hash_rows(seed=0).sum()
    return f"{samples.height}:{digest}"


def _save_checkpoint(folder: Path, model: KnowledgeEncoder, optimizer, scheduler, step: int, history: list[dict], fingerprint: str) -> None:
    with staging_dir(folder) as staging:
        model.write_files(staging)
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "history": history,
            "samples_fingerprint": fingerprint,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        torch.save(state, staging / TRAINING_STATE_FILE)
    logger.info("wrote stage-1 checkpoint at step %d to %s", step, folder)


def find_last_checkpoint(work_dir: str | os.PathLike) -> Path | None:
    """Return the newest complete checkpoint folder under `work_dir`, or None."""
    folder = Path(work_dir) / LAST_CHECKPOINT
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if (candidate / TRAINING_STATE_FILE).is_file():
            return candidate
    return None


def train_stage1(
    samples: pl.DataFrame,
    config: Stage1Config,
    work_dir: str | os.PathLike,
    on_step: Callable[[int, float], None] | None = None,
) -> Stage1Result:
    """Fine-tune a knowledge encoder on stage-1 text pairs; resume from `work_dir` when it has a checkpoint.

    `samples` needs columns text_a, text_b, concept_id (see `build_stage1_samples`). The
    checkpoint folder `work_dir/last` is rewritten after each epoch, every
    `checkpoint_every` steps and at the end, with the optimizer, scheduler and RNG state,
    so a run that crashed continues with the same batches and the same result.
    `on_step(step, loss)` is called after every optimizer step.
    """
    for column in ("text_a", "text_b", "concept_id"):
        if column not in samples.columns:
            raise ValueError(f"stage-1 samples lack column {column!r}; build them with build_stage1_samples")
    if samples.height < 2:
        raise ValueError(f"stage-1 training needs at least 2 text pairs, got {samples.height}")
    if config.batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 for a contrastive loss, got {config.batch_size}")

    device = resolve_device(config.device)
    batch_size = min(config.batch_size, samples.height)
    batches_per_epoch = samples.height // batch_size  # the last partial batch of an epoch is dropped
    total_steps = config.steps if config.steps is not None else config.epochs * batches_per_epoch
    if total_steps < 1:
        raise ValueError(f"stage-1 training has no step to run (steps={config.steps}, epochs={config.epochs})")
    warmup_steps = min(config.warmup_steps, total_steps)
    fingerprint = _samples_fingerprint(samples)
    texts_a = samples["text_a"].to_list()
    texts_b = samples["text_b"].to_list()
    labels_all = torch.from_numpy(samples["concept_id"].cast(pl.Categorical).to_physical().to_numpy().astype(np.int64))

    _seed_everything(config.seed)
    resume_from = find_last_checkpoint(work_dir)
    if resume_from is not None:
        model = load_knowledge_encoder(resume_from, device=device)
    else:
        model = build_knowledge_encoder(
            config.base_model,
            config.pooling,
            config.projection_dim,
            config.max_length,
            config.local_files_only,
            config.projection_init,
        ).to(device)
    model.config.metadata.update({"stage1": asdict(config) | {"metadata": None}, **config.metadata})
    optimizer = torch.optim.AdamW(_parameter_groups(model, config))
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps, total_steps, config.min_lr_ratio)
    start_step, history = 0, []
    if resume_from is not None:
        state = torch.load(resume_from / TRAINING_STATE_FILE, map_location="cpu", weights_only=False)
        if state["samples_fingerprint"] != fingerprint:
            raise ValueError(
                f"the checkpoint in {resume_from} was trained on other samples; remove it or use another work_dir"
            )
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, history = int(state["step"]), list(state["history"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        logger.info("resuming stage-1 training from %s at step %d of %d", resume_from, start_step, total_steps)
    else:
        logger.info(
            "starting stage-1 training: %d pairs, %d steps, batch %d, device %s", samples.height, total_steps, batch_size, device
        )

    checkpoint_dir = Path(work_dir) / LAST_CHECKPOINT
    model.train()
    order: torch.Tensor | None = None
    order_epoch = -1
    window_start, window_pairs = time.perf_counter(), 0
    run_start = time.perf_counter()
    loss_value = float("nan")
    for step in range(start_step, total_steps):
        epoch, position = divmod(step, batches_per_epoch)
        if epoch != order_epoch:
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
            order = torch.randperm(samples.height, generator=generator)
            order_epoch = epoch
        index = order[position * batch_size : (position + 1) * batch_size].tolist()

        batch = model.tokenize([texts_a[i] for i in index] + [texts_b[i] for i in index])
        # NOTE: the bf16 CUDA path has not run on a GPU yet; CPU training stays in float32.
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            embeddings = model(**batch)  # (2B, d): first texts then second texts
        loss = multi_positive_contrastive_loss(
            embeddings[: len(index)], embeddings[len(index) :], labels_all[index].to(device), model.scale()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()

        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"stage-1 loss became {loss_value} at step {step + 1}; lower the learning rate")
        window_pairs += len(index)
        done = step + 1
        if done % config.log_every == 0 or done == total_steps:
            elapsed = time.perf_counter() - window_start
            record = {
                "step": done,
                "loss": loss_value,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "logit_scale": model.scale().item(),
                "pairs_per_second": window_pairs / elapsed if elapsed > 0 else float("nan"),
            }
            history.append(record)
            logger.info(
                "stage-1 step %d/%d loss %.4f lr %.2e scale %.1f %.1f pairs/s",
                done, total_steps, loss_value, record["lr"], record["logit_scale"], record["pairs_per_second"],
            )
            window_start, window_pairs = time.perf_counter(), 0
        if on_step is not None:
            on_step(done, loss_value)

        end_of_epoch = position == batches_per_epoch - 1
        periodic = config.checkpoint_every is not None and done % config.checkpoint_every == 0
        if end_of_epoch or periodic or done == total_steps:
            _save_checkpoint(checkpoint_dir, model, optimizer, scheduler, done, history, fingerprint)

    wall = time.perf_counter() - run_start
    trained_pairs = (total_steps - start_step) * batch_size
    model.eval()
    if not history:
        loss_value = float("nan")
    else:
        loss_value = history[-1]["loss"]
    return Stage1Result(
        model=model,
        checkpoint_dir=checkpoint_dir,
        steps=total_steps,
        final_loss=loss_value,
        history=history,
        wall_seconds=wall,
        pairs_per_second=trained_pairs / wall if wall > 0 else float("nan"),
    )
