"""The knowledge encoder: a BERT-family text model with an MLP projection (KAD stage 1).

Module names follow the KAD reference model (`bert_model`, `mlp_embed`, `logit_scale`), so
the released stage-1 state dicts load without renaming.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
FORMAT_NAME = "kad-knowledge-encoder"
FORMAT_VERSION = 1
POOLINGS = ("pooler", "cls", "mean")
PROJECTION_INITS = ("kad", "identity")
# Bias that moves GELU inputs into its linear range for the "identity" projection init:
# GELU(z) = z * Phi(z) and Phi(z) > 1 - 3e-7 for z > 5, so |x| < 5 passes through unchanged.
_IDENTITY_SHIFT = 10.0

# Entries that newer transformers versions no longer keep in a BERT state dict.
_IGNORED_RELEASE_KEYS = ("bert_model.embeddings.position_ids",)


@dataclass
class KnowledgeEncoderConfig:
    """Settings that rebuild a KnowledgeEncoder; stored as config.json next to the weights."""

    base_model: str  # model name or folder the encoder started from (provenance only once saved)
    pooling: str = "pooler"  # "pooler" (BERT pooler output, as KAD), "cls" or "mean" over tokens
    projection_dim: int | None = None  # output width of the MLP; None means the encoder width
    max_length: int = 64  # tokens per text, longer texts are truncated
    # "kad": normal weights with std hidden**-0.5, as the KAD reference model. "identity":
    # Linear(I, +10), GELU, Linear(I, -10), so the untrained encoder returns the normalized
    # pooled output of the base model and fine-tuning starts from its embedding space. This
    # deviates from KAD, and suits a base model already trained for sentence embeddings.
    projection_init: str = "kad"
    logit_scale_init: float = 1.0 / 0.07  # initial temperature inverse, as in CLIP and KAD
    logit_scale_max: float = 100.0  # cap on exp(logit_scale)
    encoder_config: dict[str, Any] | None = None  # transformers config of the BERT model
    metadata: dict[str, Any] = field(default_factory=dict)  # training facts (split, steps)


class KnowledgeEncoder(nn.Module):
    """Text encoder: BERT pooled output -> Linear, GELU, Linear -> L2-normalized embedding.

    `logit_scale` is stored as a log, as in CLIP and the KAD reference model, so that
    `logit_scale.exp()` is the inverse temperature. It starts at log(1/0.07) and
    `scale()` caps it at `logit_scale_max` (100), the same clamp CLIP applies.
    """

    def __init__(self, bert_model: nn.Module, tokenizer: Any, config: KnowledgeEncoderConfig):
        super().__init__()
        if config.pooling not in POOLINGS:
            raise ValueError(f"invalid pooling {config.pooling!r}: expected one of {POOLINGS}")
        if config.projection_init not in PROJECTION_INITS:
            raise ValueError(f"invalid projection_init {config.projection_init!r}: expected one of {PROJECTION_INITS}")
        hidden = int(bert_model.config.hidden_size)
        out_dim = int(config.projection_dim or hidden)
        config.projection_dim = out_dim
        config.encoder_config = bert_model.config.to_dict()

        self.config = config
        self.tokenizer = tokenizer
        self.bert_model = bert_model
        self.mlp_embed = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale_init)))
        self._init_projection()

    def _init_projection(self) -> None:
        hidden = self.mlp_embed[0].in_features
        if self.config.projection_init == "identity":
            if self.dim != hidden:
                raise ValueError(f"projection_init='identity' needs projection_dim == {hidden}, got {self.dim}")
            with torch.no_grad():
                for layer, bias in ((self.mlp_embed[0], _IDENTITY_SHIFT), (self.mlp_embed[2], -_IDENTITY_SHIFT)):
                    layer.weight.copy_(torch.eye(hidden))
                    layer.bias.fill_(bias)
            return
        for layer in self.mlp_embed:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=hidden**-0.5)
                nn.init.zeros_(layer.bias)

    @property
    def dim(self) -> int:
        """Width of the output embedding."""
        return int(self.config.projection_dim)

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def scale(self) -> torch.Tensor:
        """Return exp(logit_scale) capped at `logit_scale_max`."""
        return self.logit_scale.exp().clamp(max=self.config.logit_scale_max)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.config.max_length,
            return_tensors="pt",
        )
        return {key: value.to(self.device) for key, value in batch.items()}

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        """Return the pooled encoder output (B, hidden), before the projection."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in extra:
            inputs["token_type_ids"] = extra["token_type_ids"]
        output = self.bert_model(**inputs)
        if self.config.pooling == "pooler":
            if getattr(output, "pooler_output", None) is None:
                raise ValueError(
                    f"the encoder {self.config.base_model!r} returns no pooler output: "
                    "use pooling='cls' or pooling='mean'"
                )
            return output.pooler_output
        hidden_states = output.last_hidden_state  # (B, T, hidden)
        if self.config.pooling == "cls":
            return hidden_states[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)  # (B, T, 1)
        return (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        """Return L2-normalized embeddings (B, dim)."""
        projected = self.mlp_embed(self.pooled(input_ids, attention_mask, **extra))
        return F.normalize(projected.float(), dim=-1)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64, project: bool = True) -> torch.Tensor:
        """Embed `texts` in eval mode without gradients; return a CPU float tensor (N, d).

        With `project=False` the result is the normalized pooled encoder output, which is how
        the base model is scored before any projection has been trained.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        was_training = self.training
        self.eval()
        chunks = []
        try:
            for start in range(0, len(texts), batch_size):
                batch = self.tokenize(texts[start : start + batch_size])
                if project:
                    chunks.append(self(**batch).cpu())
                else:
                    chunks.append(F.normalize(self.pooled(**batch).float(), dim=-1).cpu())
        finally:
            self.train(was_training)
        width = self.dim if project else int(self.bert_model.config.hidden_size)
        if not chunks:
            return torch.empty(0, width)
        return torch.cat(chunks)

    def write_files(self, folder: str | os.PathLike) -> None:
        """Write model.safetensors, config.json and the tokenizer into an existing `folder`."""
        from safetensors.torch import save_file

        folder = Path(folder)
        state = {key: value.detach().cpu().contiguous() for key, value in self.state_dict().items()}
        save_file(state, folder / WEIGHTS_FILE, metadata={"format": FORMAT_NAME})
        document = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **asdict(self.config)}
        (folder / CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True, default=str))
        self.tokenizer.save_pretrained(folder / TOKENIZER_DIR)

    def save(self, checkpoint_dir: str | os.PathLike) -> Path:
        """Write the checkpoint folder `checkpoint_dir` atomically (staging folder, then rename)."""
        target = Path(checkpoint_dir)
        with staging_dir(target) as staging:
            self.write_files(staging)
        return target


@contextlib.contextmanager
def staging_dir(target: Path):
    """Yield an empty sibling folder of `target` that replaces `target` when the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_dir(source: Path, target: Path) -> None:
    """Move folder `source` to `target`, replacing an existing `target` with two renames."""
    backup = target.with_name(target.name + ".old")
    if backup.exists():
        shutil.rmtree(backup)
    if target.exists():
        os.replace(target, backup)
    os.replace(source, target)
    if backup.exists():
        shutil.rmtree(backup)


def _load_tokenizer(source: str | os.PathLike, local_files_only: bool) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source), local_files_only=local_files_only)


def build_knowledge_encoder(
    base_model: str | os.PathLike,
    pooling: str = "pooler",
    projection_dim: int | None = None,
    max_length: int = 64,
    local_files_only: bool = True,
    projection_init: str = "kad",
) -> KnowledgeEncoder:
    """Build a KnowledgeEncoder around a pretrained BERT-family model and a fresh projection.

    `base_model` is a transformers model name or a local folder. With `local_files_only`
    (the default) transformers reads only local files and its cache, so nothing is downloaded.
    """
    from transformers import AutoModel

    source = str(base_model)
    try:
        bert = AutoModel.from_pretrained(source, local_files_only=local_files_only)
        tokenizer = _load_tokenizer(source, local_files_only)
    except OSError as error:
        raise OSError(
            f"failed to load the text model {source!r}: give a local model folder, or allow "
            f"downloads with local_files_only=False where a model hub is reachable ({error})"
        ) from error
    config = KnowledgeEncoderConfig(
        base_model=source,
        pooling=pooling,
        projection_dim=projection_dim,
        max_length=max_length,
        projection_init=projection_init,
    )
    logger.info("built knowledge encoder from %s (pooling=%s)", source, pooling)
    return KnowledgeEncoder(bert, tokenizer, config)


def read_encoder_config(checkpoint_dir: str | os.PathLike) -> KnowledgeEncoderConfig:
    """Read config.json of a saved KnowledgeEncoder folder."""
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {checkpoint_dir}: not a knowledge encoder checkpoint folder")
    document = json.loads(path.read_text())
    if document.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} has format {document.get('format')!r}, expected {FORMAT_NAME!r}")
    known = {name for name in KnowledgeEncoderConfig.__dataclass_fields__}
    return KnowledgeEncoderConfig(**{key: value for key, value in document.items() if key in known})


def load_knowledge_encoder(checkpoint_dir: str | os.PathLike, device: str | torch.device = "cpu") -> KnowledgeEncoder:
    """Load a folder written by `KnowledgeEncoder.save` (no network access, no base model needed)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    folder = Path(checkpoint_dir)
    config = read_encoder_config(folder)
    if not config.encoder_config:
        raise ValueError(f"{folder / CONFIG_FILE} has no encoder_config: the checkpoint cannot be rebuilt")
    encoder_settings = dict(config.encoder_config)
    model_type = encoder_settings.pop("model_type")
    bert = AutoModel.from_config(AutoConfig.for_model(model_type, **encoder_settings))
    tokenizer = _load_tokenizer(folder / TOKENIZER_DIR, local_files_only=True)
    model = KnowledgeEncoder(bert, tokenizer, config)

    state = load_file(folder / WEIGHTS_FILE)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if key not in _IGNORED_RELEASE_KEYS]
    if missing or unexpected:
        raise ValueError(f"{folder / WEIGHTS_FILE} does not match the model: missing {missing}, unexpected {unexpected}")
    model.to(device).eval()
    return model


def load_kad_stage1_checkpoint(
    checkpoint_path: str | os.PathLike,
    base_model: str | os.PathLike,
    max_length: int = 64,
    local_files_only: bool = True,
    weights_only: bool = True,
) -> KnowledgeEncoder:
    """Load a released KAD stage-1 `.pt` file into a KnowledgeEncoder.

    The file is a dict whose `state_dict` contains `bert_model.*`, `mlp_embed.*` and
    `logit_scale`; a `module.` prefix (from DistributedDataParallel) is stripped and an
    `embeddings.position_ids` entry is ignored. The file carries no architecture, so
    `base_model` names the matching BERT model and tokenizer (for the released weights,
    PubMedBERT). `weights_only=True` refuses pickled Python objects; pass False only for
    files from a trusted source.
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"KAD stage-1 checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:  # torch raises UnpicklingError or RuntimeError here
        raise ValueError(
            f"failed to read {path} as a KAD stage-1 checkpoint ({error}); if the file is trusted "
            "and holds pickled objects, pass weights_only=False"
        ) from error
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a KAD checkpoint: expected a dict with a state_dict, found {type(payload).__name__}")
    state = {(key[len("module.") :] if key.startswith("module.") else key): value for key, value in state.items()}
    state = {key: value for key, value in state.items() if key not in _IGNORED_RELEASE_KEYS}
    for required in ("mlp_embed.0.weight", "mlp_embed.2.weight", "logit_scale"):
        if required not in state:
            raise ValueError(f"{path} is not in the KAD stage-1 layout: entry {required!r} is missing")

    projection_dim = int(state["mlp_embed.2.weight"].shape[0])
    model = build_knowledge_encoder(
        base_model, pooling="pooler", projection_dim=projection_dim, max_length=max_length,
        local_files_only=local_files_only,
    )
    logit_scale = state["logit_scale"]
    if logit_scale.dim() > 0:
        state["logit_scale"] = logit_scale.reshape(())
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if key not in _IGNORED_RELEASE_KEYS]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match base model {base_model!s}: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    model.config.metadata["loaded_from"] = str(path)
    logger.info("loaded KAD stage-1 checkpoint %s onto %s", path, base_model)
    return model.eval()
