"""The way back: backbone weights from other libraries' files, in lvd's (the official hub) layout.

a transformers DINOv2 directory --read_transformers--> hub-layout state dict
a timm DINOv2 checkpoint (.safetensors or .pth, no mask token) --from_timm_state--> hub-layout state dict
a hub file, an lvd export or training snapshot --> as stored (the caller unwraps snapshots)
"""

from __future__ import annotations

from pathlib import Path

import torch

from training.interop.timm_format import from_timm_state, is_timm_state, read_timm_file
from training.interop.transformers_format import is_transformers_dir, read_transformers

TRANSFORMERS_WEIGHTS = "model.safetensors"


def read_backbone_state(path: Path) -> dict:
    if path.is_dir():
        if not is_transformers_dir(path):
            raise ValueError(f"{path}: a weights folder must be a transformers DINOv2 directory")
        return read_transformers(path)
    loaded = (
        read_timm_file(path)
        if path.suffix == ".safetensors"
        else torch.load(path, map_location="cpu", weights_only=True)
    )
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(loaded).__name__}")
    return from_timm_state(loaded) if is_timm_state(loaded) else loaded


def weights_file(path: Path) -> Path:
    """The file whose bytes are the weights (what stage keys fingerprint): a directory's safetensors."""
    return path / TRANSFORMERS_WEIGHTS if path.is_dir() else path
