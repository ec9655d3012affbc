"""The KAD image model: image encoder plus Disease Query Network, its losses and its loader.

Text embeddings (queries and each report's entity text) come from the frozen stage-1 knowledge
encoder and are computed outside this module, so one training step runs no text encoder.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kad_pipeline.models.dqn import DiseaseQueryNetwork
from kad_pipeline.models.image_encoder import build_image_encoder, default_resnet_cut

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UNCERTAIN_POLICIES = ("negative", "ignore")


@dataclass
class KADConfig:
    """Architecture and input settings saved with every checkpoint as ``config.json``."""

    backbone: str = "resnet50"  # resnet18|resnet34|resnet50|resnet101|vit_b_16
    image_size: int = 224  # pixels per side of the square network input
    embed_dim: int = 768  # d: the knowledge encoder's width
    resnet_cut: str | None = None  # "layer3" or "layer4"; None picks layer3 below 512 px, else layer4
    num_layers: int = 4  # DQN decoder layers
    num_heads: int = 4
    ff_dim: int = 1024
    dropout: float = 0.1
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel normalization of [0, 1] pixels
    std: tuple[float, float, float] = IMAGENET_STD
    query_names: list[str] = field(default_factory=list)  # queries the model was trained with, in label order
    uncertain_policy: str = "negative"  # how -1 labels were trained: "negative" (reference default) or "ignore"
    temperature: float = 0.07  # image-text contrastive softmax temperature
    weights_path: str | None = None  # local torchvision-format backbone weights; never downloaded

    def __post_init__(self) -> None:
        if self.uncertain_policy not in UNCERTAIN_POLICIES:
            raise ValueError(f"invalid uncertain_policy {self.uncertain_policy!r}; expected one of {UNCERTAIN_POLICIES}")
        if self.resnet_cut is None and self.backbone.startswith("resnet"):
            self.resnet_cut = default_resnet_cut(self.image_size)
        self.mean = tuple(float(value) for value in self.mean)
        self.std = tuple(float(value) for value in self.std)
        self.query_names = list(self.query_names)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> KADConfig:
        known = {item.name for item in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown KADConfig fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**values)


class KADModel(nn.Module):
    """Image encoder and DQN. Inputs are normalized float images, (B, 1 or 3, H, W)."""

    def __init__(self, config: KADConfig):
        super().__init__()
        self.config = config
        self.image_encoder = build_image_encoder(
            config.backbone, config.image_size, config.embed_dim, config.resnet_cut, config.weights_path
        )
        self.dqn = DiseaseQueryNetwork(config.embed_dim, config.num_layers, config.num_heads, config.ff_dim, config.dropout)
        self.register_buffer("pixel_mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, pixels: Tensor) -> Tensor:
        """Turn pixels (uint8, or float in [0, 1]) of shape (B, 1 or 3, H, W) into normalized 3-channel input."""
        if pixels.dtype == torch.uint8:
            pixels = pixels.float().div_(255.0)
        # A grayscale channel broadcasts against the three channel statistics, which gives the
        # same result as replicating it into RGB first.
        return (pixels - self.pixel_mean) / self.pixel_std

    def encode_image(self, images: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """Return image tokens (B, N, d), the pooled feature (B, d) = mean of tokens, and the token grid."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        tokens, grid = self.image_encoder(images)
        return tokens, tokens.mean(dim=1), grid

    def forward(
        self, images: Tensor, query_embeddings: Tensor, text_memory: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Run one training forward pass.

        Returns DQN logits (B, Q, 2) on the image tokens, the pooled image feature (B, d), and,
        when ``text_memory`` (B, d) is given, DQN logits (B, Q, 2) with each entity-text embedding
        as the single memory token. Everything goes through this one call, so DDP finds every
        parameter used in its forward pass.
        """
        tokens, pooled, _ = self.encode_image(images)
        logits, _ = self.dqn(tokens, query_embeddings)
        text_logits = None
        if text_memory is not None:
            text_logits, _ = self.dqn(text_memory.unsqueeze(1).to(tokens.dtype), query_embeddings)
        return logits, pooled, text_logits

    @torch.no_grad()
    def score(self, images: Tensor, query_embeddings: Tensor, layer: str = "last") -> tuple[Tensor, Tensor]:
        """Score normalized images against queries.

        Returns probabilities (B, Q), the softmax index 1 of the DQN head, and cross-attention
        maps (B, Q, h, w) from the last decoder layer (``layer="last"``) or averaged over all
        layers (``layer="mean"``). The model is switched to eval mode, so dropout is off.
        """
        if layer not in ("last", "mean"):
            raise ValueError(f"invalid attention layer {layer!r}; expected 'last' or 'mean'")
        self.eval()
        tokens, _, (height, width) = self.encode_image(images)
        logits, maps = self.dqn(tokens, query_embeddings.to(tokens.dtype), need_weights=True)
        probs = logits.float().softmax(dim=-1)[..., 1]
        attention = maps[-1] if layer == "last" else torch.stack(maps).mean(dim=0)
        attention = attention.float().reshape(attention.shape[0], attention.shape[1], height, width)
        return probs, attention


def dqn_classification_loss(logits: Tensor, labels: Tensor, uncertain_policy: str) -> Tensor:
    """Cross-entropy of DQN logits (B, Q, 2) against labels (B, Q) in {1, 0, -1}.

    -1 (uncertain) counts as 0 with ``"negative"`` and is left out of the mean with ``"ignore"``.
    Callers map "not mentioned" to 0 before this point.
    """
    labels = labels.long()
    if uncertain_policy == "negative":
        targets = labels.clamp(min=0)
        mask = torch.ones_like(labels, dtype=torch.bool)
    elif uncertain_policy == "ignore":
        mask = labels >= 0
        targets = labels.clamp(min=0)
    else:
        raise ValueError(f"invalid uncertain_policy {uncertain_policy!r}; expected one of {UNCERTAIN_POLICIES}")
    per_label = F.cross_entropy(logits.float().reshape(-1, 2), targets.reshape(-1), reduction="none")
    mask = mask.reshape(-1).float()
    return (per_label * mask).sum() / mask.sum().clamp(min=1.0)


def image_text_contrastive_loss(
    image_features: Tensor, text_features: Tensor, text_ids: Tensor, temperature: float
) -> Tensor:
    """Symmetric InfoNCE between pooled image features (B, d) and entity-text embeddings (B, d).

    Pairs whose entity texts are identical (``text_ids`` equal) all count as positives, with the
    target probability spread evenly over them. NOTE: this differs from the one-hot CLIP target.
    Many reports share one entity text (for example "normal"), and a one-hot target would push
    images with identical texts apart.
    """
    image_features = F.normalize(image_features.float(), dim=-1)
    text_features = F.normalize(text_features.float(), dim=-1)
    logits = image_features @ text_features.t() / temperature  # (B, B)
    positives = (text_ids.unsqueeze(0) == text_ids.unsqueeze(1)).float()
    targets = positives / positives.sum(dim=1, keepdim=True)
    image_to_text = F.cross_entropy(logits, targets)
    text_to_image = F.cross_entropy(logits.t(), targets)
    return (image_to_text + text_to_image) / 2


def load_kad_model(checkpoint_dir: str | Path, map_location: str | torch.device = "cpu") -> KADModel:
    """Load a checkpoint folder written by ``save_kad_checkpoint`` (``model.safetensors`` + ``config.json``)."""
    from kad_pipeline.models.checkpoints import load_checkpoint_dir

    return load_checkpoint_dir(checkpoint_dir, map_location=map_location)


def read_config(checkpoint_dir: str | Path) -> KADConfig:
    """Read ``config.json`` of a checkpoint folder."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint config not found: {path}")
    return KADConfig.from_dict(json.loads(path.read_text())["model"])
