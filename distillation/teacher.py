"""The frozen teacher of a distillation run, from an lvd checkpoint or an official hub-format backbone.

    lvd checkpoint (root or step folder) --backbones.json + config.json--> backbone + DINO/iBOT heads
      with the EMA teacher's weights (strict load)
    hub-format .pth (e.g. dinov2_vitg14_pretrain.pth) --teacher_arch options, grid from pos_embed-->
      backbone only (strict load); heads, if the objective needs them, are freshly initialised

Every load uses weights_only=True; every parameter is frozen.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distillation.config import DistillConfig
from pipelines.config import build_config, load_file
from training.checkpoint import (
    BACKBONES_FILE,
    CONFIG_FILE,
    backbone_options,
    read_model_tensors,
    resolve_checkpoint,
)
from training.config import PretrainConfig
from training.interop.load import read_backbone_state
from training.interop.transformers_format import is_transformers_dir
from training.models.vit import build_vit_from_options
from training.ssl import build_heads

TEACHER_PREFIX = "teacher."
RUN_CONFIG_SECTION = "pretrain"  # what error messages call the checkpoint's recipe


@dataclass(frozen=True, slots=True)
class FrozenTeacher:
    modules: nn.ModuleDict
    """backbone, plus dino_head (and ibot_head) when the source has heads."""
    head_config: PretrainConfig | None
    """The config that built the heads (None for a bare backbone)."""
    options: dict
    """build_vit options of the backbone."""
    source: str


def read_run_config(root: Path) -> PretrainConfig:
    """The recipe a checkpoint was trained with, validated like any user config."""
    return build_config(PretrainConfig, load_file(root / CONFIG_FILE), RUN_CONFIG_SECTION)


def is_checkpoint(path: Path) -> bool:
    """An lvd run folder (a transformers directory is a backbone file in another layout)."""
    return path.is_dir() and not is_transformers_dir(path)


def load_checkpoint_teacher(path: Path) -> FrozenTeacher:
    """The EMA teacher (backbone and heads) of an lvd pretraining checkpoint."""
    step = resolve_checkpoint(path)
    options = json.loads((step.parent / BACKBONES_FILE).read_text())["teacher"]
    run_cfg = read_run_config(step.parent)
    backbone = build_vit_from_options(options)
    modules = nn.ModuleDict({"backbone": backbone, **build_heads(run_cfg, backbone.embed_dim)})
    tensors = read_model_tensors(step, TEACHER_PREFIX)
    modules.load_state_dict(
        {name.removeprefix(TEACHER_PREFIX): t for name, t in tensors.items()}, strict=True
    )
    return FrozenTeacher(_frozen(modules), run_cfg, options, str(path))


def read_hub_backbone(path: Path, cfg: DistillConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights of a backbone file (official hub layout, a timm checkpoint or a transformers
    directory) and the build options that fit them
    (`cfg.teacher_arch`, with the image size its position table was made for)."""
    state = read_backbone_state(path)
    if "pos_embed" not in state:
        raise ValueError(f"{path}: not a DINOv2 hub backbone (no pos_embed)")
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    return state, backbone_options(cfg.teacher_arch, img_size=grid * cfg.teacher_arch.patch_size)


def load_hub_teacher(path: Path, cfg: DistillConfig, with_heads: bool) -> FrozenTeacher:
    """An official-format backbone file; fresh (seeded, frozen) heads from `cfg.recipe` if `with_heads`."""
    state, options = read_hub_backbone(path, cfg)
    backbone = build_vit_from_options(options)
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not match distill.teacher_arch {cfg.teacher_arch}: {err}") from None
    heads = build_heads(cfg.recipe, backbone.embed_dim) if with_heads else {}
    modules = nn.ModuleDict({"backbone": backbone, **heads})
    return FrozenTeacher(_frozen(modules), cfg.recipe if with_heads else None, options, str(path))


def _frozen(modules: nn.ModuleDict) -> nn.ModuleDict:
    modules.requires_grad_(False)
    return modules.eval()
