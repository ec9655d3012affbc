"""Checkpoint folders of the KAD model, training state for resume, and released KAD checkpoints.

A checkpoint folder contains ``model.safetensors`` (weights), ``config.json`` (``{"model": KADConfig,
"training": {...}}``) and, when known, ``query_embeddings.safetensors`` (the (Q, d) queries it was
trained with). A resumable folder adds ``training_state.pt`` (optimizer, scheduler, step counters
and RNG states). Every file is written to a temporary name and moved into place.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from kad_pipeline.models.kad import KADConfig, KADModel

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
QUERIES_FILE = "query_embeddings.safetensors"
TRAINING_STATE_FILE = "training_state.pt"


def _atomic_path(final_path: Path) -> Path:
    handle, name = tempfile.mkstemp(dir=final_path.parent, prefix=f".{final_path.name}.", suffix=".tmp")
    os.close(handle)
    return Path(name)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def save_kad_checkpoint(
    model: KADModel,
    checkpoint_dir: str | Path,
    query_embeddings: torch.Tensor | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write weights, config and optional query embeddings of ``model`` into ``checkpoint_dir``."""
    model = _unwrap(model)
    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)

    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    temp = _atomic_path(directory / WEIGHTS_FILE)
    safetensors.torch.save_file(state, str(temp), metadata={"format": "pt"})
    os.replace(temp, directory / WEIGHTS_FILE)

    if query_embeddings is not None:
        temp = _atomic_path(directory / QUERIES_FILE)
        safetensors.torch.save_file({"query_embeddings": query_embeddings.detach().cpu().float().contiguous()}, str(temp))
        os.replace(temp, directory / QUERIES_FILE)

    temp = _atomic_path(directory / CONFIG_FILE)
    temp.write_text(json.dumps({"model": model.config.to_dict(), "training": training or {}}, indent=2))
    os.replace(temp, directory / CONFIG_FILE)
    return directory


def load_checkpoint_dir(checkpoint_dir: str | Path, map_location: str | torch.device = "cpu") -> KADModel:
    """Build a ``KADModel`` from a checkpoint folder, in eval mode."""
    directory = Path(checkpoint_dir)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"checkpoint file not found: {directory / name}")
    config = KADConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text())["model"])
    # The backbone weights are in model.safetensors, so an initial weights file is not needed again.
    config.weights_path = None
    model = KADModel(config)
    state = safetensors.torch.load_file(str(directory / WEIGHTS_FILE), device="cpu")
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


def load_query_embeddings(checkpoint_dir: str | Path) -> torch.Tensor | None:
    """Return the (Q, d) query embeddings saved with a checkpoint, or None when absent."""
    path = Path(checkpoint_dir) / QUERIES_FILE
    if not path.is_file():
        return None
    return safetensors.torch.load_file(str(path))["query_embeddings"]


def capture_rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(checkpoint_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write ``training_state.pt`` (optimizer, scheduler, counters, RNG states) atomically."""
    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    temp = _atomic_path(directory / TRAINING_STATE_FILE)
    torch.save(state, temp)
    os.replace(temp, directory / TRAINING_STATE_FILE)
    return directory / TRAINING_STATE_FILE


def load_training_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / TRAINING_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"training state not found: {path}")
    # The state contains Python RNG tuples and numpy arrays, which weights_only loading rejects.
    # It is only ever read from folders this pipeline wrote itself.
    return torch.load(path, map_location="cpu", weights_only=False)


# --- Released KAD checkpoints -------------------------------------------------------------

def strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that DataParallel/DDP adds to every key."""
    return {key[len("module."):] if key.startswith("module.") else key: value for key, value in state.items()}


def clean_released_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ``module.`` prefixes and drop ``embeddings.position_ids`` buffers.

    BERT checkpoints saved by older transformers versions carry ``embeddings.position_ids``,
    which current versions no longer register, so strict loading would reject it.
    """
    return {key: value for key, value in strip_module_prefix(state).items() if not key.endswith("embeddings.position_ids")}


def _dqn_state_from_released(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # The reference DQN keeps its layers under ``decoder.layers`` and registers the shared
    # LayerNorm twice, as ``decoder_norm`` and ``decoder.norm``. Ours uses ``layers`` and one name.
    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("decoder.layers."):
            converted["layers." + key[len("decoder.layers."):]] = value
        elif key.startswith("decoder.norm."):
            converted.setdefault("decoder_norm." + key[len("decoder.norm."):], value)
        else:
            converted[key] = value
    return converted


def read_released_checkpoint(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """Read a released KAD ``.pt`` file into cleaned ``dqn``, ``image_encoder`` and ``text_encoder`` state dicts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"released KAD checkpoint not found: {path}")
    # Released checkpoints are plain dicts of tensors, which weights_only loading accepts.
    raw = torch.load(path, map_location="cpu", weights_only=True)
    missing = [name for name in ("model", "image_encoder") if name not in raw]
    if missing:
        raise ValueError(f"{path} is not a KAD stage-2 checkpoint: missing keys {missing}; found {sorted(raw)}")
    return {
        "dqn": _dqn_state_from_released(clean_released_state(raw["model"])),
        "image_encoder": clean_released_state(raw["image_encoder"]),
        "text_encoder": clean_released_state(raw.get("text_encoder", {})),
    }


def _load_part(module: torch.nn.Module, state: dict[str, torch.Tensor], part: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"released {part} weights lack {len(missing)} keys, e.g. {missing[:5]}; check the backbone and cut")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        logger.info("ignoring %d released %s keys not used here, e.g. %s", len(unexpected), part, unexpected[:5])
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise ValueError(
                f"released {part} weight {key} has shape {tuple(state[key].shape)}, ours {tuple(tensor.shape)}; "
                "check embed_dim, backbone and cut"
            )
    module.load_state_dict({key: state[key] for key in expected}, strict=True)


def load_released_kad_checkpoint(path: str | Path, config: KADConfig) -> tuple[KADModel, dict[str, torch.Tensor]]:
    """Load a released KAD ``.pt`` checkpoint into a ``KADModel`` built from ``config``.

    Returns the model (eval mode) and the cleaned text-encoder state dict for the knowledge
    encoder loader. NOTE: key names follow the released reference code layout (``res_features``,
    ``res_l1``, ``res_l2``; ``decoder.layers``, ``decoder_norm``, ``mlp_head``); a tested example
    file was synthesised in that layout, not downloaded.
    """
    parts = read_released_checkpoint(path)
    model = KADModel(config)
    _load_part(model.image_encoder, parts["image_encoder"], "image_encoder")
    _load_part(model.dqn, parts["dqn"], "model")
    return model.eval(), parts["text_encoder"]
