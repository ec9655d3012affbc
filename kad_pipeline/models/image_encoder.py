"""Image encoders of KAD: a ResNet cut into a grid of patch tokens, or a ViT-B/16.

Both return ``(tokens, grid)``: tokens of shape ``(B, N, d)`` projected to the text width ``d``,
and ``grid = (h, w)`` with ``h * w == N`` so attention maps can be reshaped onto the image.
Weights never download: torchvision builds each backbone with ``weights=None`` and an optional
local ``weights_path`` (a torchvision-format state dict) initialises it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

logger = logging.getLogger(__name__)

RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
VIT_ARCHS = ("vit_b_16",)


def default_resnet_cut(image_size: int) -> str:
    """Return the last ResNet stage kept for an input size: layer3 below 512 px, else layer4.

    At 224 px layer3 gives a 14x14 grid (stride 16). At 512 px and above the KAD reference code
    keeps layer4 (stride 32), which gives a 16x16 grid at 512 px.
    """
    return "layer3" if image_size < 512 else "layer4"


def _load_backbone_weights(backbone: nn.Module, weights_path: str | None) -> None:
    if not weights_path:
        return
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}; set weights_path to a local state dict")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    logger.info(
        "loaded backbone weights from %s (%d missing, %d unexpected keys)", path, len(missing), len(unexpected)
    )


class ResNetImageEncoder(nn.Module):
    """ResNet trunk up to ``cut``, flattened into tokens, then Linear(C, C), ReLU, Linear(C, d).

    With resnet50 cut after layer3 at 224 px the trunk gives 14x14 tokens of 1024 channels, as in
    the KAD paper. The attribute names ``res_features``, ``res_l1`` and ``res_l2`` follow the
    released KAD image-encoder state dicts so those load without renaming.
    """

    def __init__(self, arch: str = "resnet50", cut: str = "layer3", embed_dim: int = 768, weights_path: str | None = None):
        super().__init__()
        if arch not in RESNET_ARCHS:
            raise ValueError(f"unknown ResNet arch {arch!r}; expected one of {RESNET_ARCHS}")
        if cut not in ("layer3", "layer4"):
            raise ValueError(f"invalid ResNet cut {cut!r}; expected 'layer3' or 'layer4'")
        backbone = getattr(torchvision.models, arch)(weights=None)
        _load_backbone_weights(backbone, weights_path)

        stages = [backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool, backbone.layer1, backbone.layer2, backbone.layer3]
        channels = backbone.fc.in_features // 2
        if cut == "layer4":
            stages.append(backbone.layer4)
            channels = backbone.fc.in_features
        self.res_features = nn.Sequential(*stages)
        self.res_l1 = nn.Linear(channels, channels)
        self.res_l2 = nn.Linear(channels, embed_dim)
        self.feature_channels = channels

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        features = self.res_features(images)  # (B, C, h, w)
        batch, channels, height, width = features.shape
        tokens = features.flatten(2).transpose(1, 2)  # (B, h*w, C)
        tokens = self.res_l2(torch.relu(self.res_l1(tokens)))  # (B, h*w, d)
        return tokens, (height, width)


class ViTImageEncoder(nn.Module):
    """torchvision ViT-B/16 whose patch tokens (class token dropped) go through Linear, ReLU, Linear to ``d``."""

    def __init__(self, image_size: int = 224, embed_dim: int = 768, weights_path: str | None = None):
        super().__init__()
        if image_size % 16 != 0:
            raise ValueError(f"ViT-B/16 needs an image size divisible by 16, got {image_size}")
        self.vit = torchvision.models.vit_b_16(weights=None, image_size=image_size)
        _load_backbone_weights(self.vit, weights_path)
        hidden = self.vit.hidden_dim
        self.vit.heads = nn.Identity()
        self.proj_l1 = nn.Linear(hidden, hidden)
        self.proj_l2 = nn.Linear(hidden, embed_dim)
        self.grid = image_size // 16

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        patches = self.vit._process_input(images)  # (B, N, hidden)
        class_token = self.vit.class_token.expand(patches.shape[0], -1, -1)
        encoded = self.vit.encoder(torch.cat([class_token, patches], dim=1))
        tokens = self.proj_l2(torch.relu(self.proj_l1(encoded[:, 1:])))  # (B, N, d)
        return tokens, (self.grid, self.grid)


def build_image_encoder(
    backbone: str, image_size: int, embed_dim: int, cut: str | None = None, weights_path: str | None = None
) -> nn.Module:
    """Build the image encoder named by ``backbone`` (a ResNet arch or ``vit_b_16``)."""
    if backbone in RESNET_ARCHS:
        return ResNetImageEncoder(backbone, cut or default_resnet_cut(image_size), embed_dim, weights_path)
    if backbone in VIT_ARCHS:
        return ViTImageEncoder(image_size, embed_dim, weights_path)
    raise ValueError(f"unknown image backbone {backbone!r}; expected one of {RESNET_ARCHS + VIT_ARCHS}")
