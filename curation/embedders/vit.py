"""ViT embedders: lvd backbones (`training.models.vit.build_vit`) loaded from a DINOv2-format weights file.

    weights file --torch.load (weights only)--> state dict --hub layout--> build_vit(img_size from pos_embed)
      --load_state_dict(strict=True)--> image [n, 3, S, S] --forward_features--> x_norm_clstoken [n, dim]

Three file layouts load (recipe section 9): an official hub backbone (`dinov2_vitl14_pretrain.pth`:
`cls_token`, `blocks.0.attn.qkv.weight`, ...), an lvd export (the same layout), and a training eval
snapshot `{"teacher": {"backbone.blocks.<chunk>.<i>...", "dino_head...."}}`, whose backbone keys are
unprefixed and unchunked here. Loading is strict: a key the model lacks, or misses, is an error rather
than a silently random layer. The grid the weights were trained at (518 px for hub files) comes from
`pos_embed`; images of `image_size` interpolate it, as DINOv2 does. Preprocessing: `short_side` resizes
the shorter side to image_size * 256 / 224 and centre-crops image_size (DINOv2's evaluation transform);
`square` resizes to image_size x image_size.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torchvision import transforms

from curation.embedders.base import Embedder, normalise, square_transform
from curation.embedders.config import EmbedderConfig
from curation.embedders.registry import configured_path, register_embedder
from pipelines.validation import require
from training.interop.load import read_backbone_state, weights_file
from training.models.layers import check_ffn_layer
from training.models.vit import build_vit, check_arch

KIND = "vit"
# The ImageNet evaluation transform resizes to 256 before a 224 centre crop.
RESIZE_PER_CROP = 256 / 224
TEACHER_KEY = "teacher"
BACKBONE_PREFIX = "backbone."
# `blocks.<chunk>.<i>.` when the training run used block_chunks > 0 (FSDP wrapping units).
CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")
# Marks a hub-layout backbone state dict.
HUB_KEY = "cls_token"


def hub_state_dict(loaded: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The backbone state dict in hub layout, from a hub file, an lvd export or a teacher snapshot.

    Raises:
        ValueError: the file is none of these layouts.
    """
    if HUB_KEY in loaded:
        return dict(loaded)  # type: ignore[arg-type]
    teacher = loaded.get(TEACHER_KEY)
    if isinstance(teacher, Mapping):
        backbone = {
            CHUNKED_BLOCK.sub(r"blocks.\1.", name[len(BACKBONE_PREFIX) :]): tensor
            for name, tensor in teacher.items()
            if name.startswith(BACKBONE_PREFIX)
        }
        if HUB_KEY in backbone:
            return backbone
    raise ValueError(
        f"not a ViT backbone file: expected a DINOv2 hub state dict (keys like {HUB_KEY!r}) or a training "
        f"snapshot {{'{TEACHER_KEY}': {{'{BACKBONE_PREFIX}{HUB_KEY}': ...}}}}; "
        f"found keys {sorted(loaded)[:5]}"
    )


def grid_image_size(state: Mapping[str, torch.Tensor], cfg: EmbedderConfig) -> int:
    """The image size the weights' position embeddings were made for: sqrt(tokens - 1) * patch_size."""
    if "pos_embed" not in state:
        raise ValueError("the backbone state dict has no pos_embed: not a DINOv2 ViT backbone")
    patches = state["pos_embed"].shape[1] - 1
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"pos_embed holds {patches} patch positions, not a square grid")
    return side * cfg.patch_size


def load_vit(cfg: EmbedderConfig) -> torch.nn.Module:
    """The backbone of `cfg.path` (or the named weights), built from `cfg`'s arch options, strictly."""
    source = vit_source(cfg)
    state = hub_state_dict(read_backbone_state(source))
    model = build_vit(
        cfg.arch,
        patch_size=cfg.patch_size,
        img_size=grid_image_size(state, cfg),
        num_register_tokens=cfg.num_register_tokens,
        ffn_layer=cfg.ffn_layer,
        # Why: hub and lvd backbones carry LayerScale (ls1.gamma); a file without it must load too.
        layerscale_init=1.0 if "blocks.0.ls1.gamma" in state else None,
        interpolate_offset=cfg.interpolate_offset,
        interpolate_antialias=cfg.interpolate_antialias,
    )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{source} does not fit {cfg.arch}/{cfg.patch_size} with {cfg.num_register_tokens} register "
            f"tokens and ffn_layer {cfg.ffn_layer}: set arch, patch_size, num_register_tokens and ffn_layer "
            f"to the weights' own (vit_giant2 uses swiglufused, _reg4 files 4 registers). {err}"
        ) from err
    return model.eval()


class _ClassToken(torch.nn.Module):
    """The backbone's normalised class token: DINOv2's image embedding."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(batch)["x_norm_clstoken"]


def build_vit_embedder(cfg: EmbedderConfig) -> Embedder:
    backbone = load_vit(cfg)
    if cfg.resize == "square":
        transform = square_transform(cfg)
    else:  # Why: built here, not via a replaced config, whose resize size need not be a patch multiple.
        short_side = round(cfg.image_size * RESIZE_PER_CROP)
        steps = [transforms.Resize(short_side), transforms.CenterCrop(cfg.image_size)]
        transform = transforms.Compose([*steps, *normalise(cfg.mean, cfg.std)])
    model = _ClassToken(backbone).to(cfg.device)
    return Embedder(
        dim=backbone.cls_token.shape[-1],
        batch_size=cfg.batch_size,
        device=cfg.device,
        transform=transform,
        features=model,
    )


def check_vit_config(cfg: EmbedderConfig) -> None:
    """A `vit` config names a registered arch and FFN layer, and images that tile into its patches."""
    require(
        bool(cfg.path or cfg.weights),
        f"{KIND} embedders need a path to a weights file or a transformers directory, or weights by name",
    )
    check_arch(cfg.arch)
    check_ffn_layer(cfg.ffn_layer)
    require(
        cfg.image_size % cfg.patch_size == 0,
        f"vit: image_size must be a multiple of patch_size {cfg.patch_size}, got {cfg.image_size}",
    )


def vit_source(cfg: EmbedderConfig) -> Path:
    """The configured (or downloaded) weights: a file, or a transformers directory."""
    return Path(configured_path(cfg))


def vit_weights_file(cfg: EmbedderConfig) -> str | None:
    """What keys the stage: the weights file, or a transformers directory's."""
    return None if cfg.path is None and cfg.weights is None else str(weights_file(vit_source(cfg)))


register_embedder(KIND, build_vit_embedder, vit_weights_file, check_vit_config)
