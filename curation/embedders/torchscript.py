"""TorchScript embedders: any scripted or traced module that maps [n, 3, H, W] to [n, dim] vectors.

This is how SSCD ships (`sscd_disc_mixup.torchscript.pt`: 512-d, L2-normalised); loading one needs no
SSCD code. Preprocessing follows SSCD: ImageNet mean/std and either a square resize (SSCD's advice for
batching, e.g. 320) or the paper's aspect-preserving resize of the shorter side (e.g. 288), which forces
one image per batch as SSCD's own inference code does.
"""

from __future__ import annotations

import warnings

import torch

from curation.embedders.base import Embedder, probe_dim, short_side_transform, square_transform
from curation.embedders.config import EmbedderConfig
from curation.embedders.registry import configured_path, register_embedder

KIND = "torchscript"


def build_torchscript(cfg: EmbedderConfig) -> Embedder:
    with warnings.catch_warnings():
        # Why: torch marks TorchScript deprecated, but it is the format SSCD's weights ship in.
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(configured_path(cfg), map_location=cfg.device)
    model.eval()
    if cfg.resize == "square":
        transform, batch_size = square_transform(cfg), cfg.batch_size
    else:  # aspect ratio kept: every image has its own size, so none batch together
        transform, batch_size = short_side_transform(cfg), 1
    return Embedder(
        dim=probe_dim(model, cfg.image_size, cfg.device),
        batch_size=batch_size,
        device=cfg.device,
        transform=transform,
        features=model,
    )


register_embedder(KIND, build_torchscript, configured_path)
