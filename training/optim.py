"""Optimisation (recipe section 5): parameter groups, AdamW, per-step schedules, per-module clipping.

    student modules {backbone, dino_head, ibot_head} --param_groups--> groups fused by
      (lr_multiplier, wd_multiplier, is_last_layer) --build_optimizer--> AdamW
    PretrainConfig + global batch --build_schedules--> Schedules (one float64 array per quantity)
    every step: apply_schedules(optimizer, schedules.at(step)); backward; clip_grad_norms; optimizer.step()

Schedules are indexed by iteration ("epochs" are `official_epoch_length` iterations each), built once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from training.config import PretrainConfig

LR_REFERENCE_BATCH = 1024  # base_lr is quoted for this many images per step (sqrt scaling rule)
EMBEDDING_PARAMS = frozenset({"pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens"})
NO_DECAY_SUBSTRINGS = ("norm", "gamma")  # every LayerNorm and LayerScale
SCHEDULE_NAMES = ("lr", "weight_decay", "momentum", "teacher_temp", "last_layer_lr")
GRAD_NORM_TYPE = 2.0


def cosine_schedule(
    base_value: float,
    final_value: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup_value: float = 0.0,
    freeze_iters: int = 0,
) -> np.ndarray:
    """freeze_iters zeros, a linear warmup start_warmup_value -> base_value (both ends included), then
    final + (base - final)(1 + cos(pi i / n)) / 2 for i = 0 .. n-1; float64, length total_iters."""
    num_cosine = total_iters - warmup_iters - freeze_iters
    if num_cosine < 0:
        raise ValueError(
            f"warmup_iters {warmup_iters} + freeze_iters {freeze_iters} exceed total_iters {total_iters}"
        )
    freeze = np.zeros(freeze_iters)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    steps = np.arange(num_cosine)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / num_cosine))
    return np.concatenate((freeze, warmup, cosine))


def schedule_value(values: np.ndarray, step: int, final_value: float) -> float:
    """values[step], or final_value once the schedule is over."""
    return float(values[step]) if step < len(values) else final_value


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The peak lr for `global_batch` images per step: base_lr * sqrt(global_batch / 1024)."""
    return base_lr * math.sqrt(global_batch / LR_REFERENCE_BATCH)


@dataclass(frozen=True, kw_only=True, slots=True)
class Schedules:
    """Per-iteration values; past an array's end its entry in `final_values` holds."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    """Teacher EMA momentum."""
    teacher_temp: np.ndarray
    last_layer_lr: np.ndarray
    final_values: Mapping[str, float]

    def at(self, step: int) -> dict[str, float]:
        """{"lr", "weight_decay", "momentum", "teacher_temp", "last_layer_lr"} at iteration `step`."""
        return {
            name: schedule_value(getattr(self, name), step, self.final_values[name])
            for name in SCHEDULE_NAMES
        }


def epochs_to_iters(epochs: float, epoch_length: int) -> int:
    return round(epochs * epoch_length)


def build_schedules(cfg: PretrainConfig, global_batch: int) -> Schedules:
    """The official schedules (recipe 5.4) for `global_batch` images per step (all ranks)."""
    optim, teacher = cfg.optim, cfg.teacher
    epoch_length = cfg.train.official_epoch_length
    total_iters = epochs_to_iters(optim.epochs, epoch_length)
    peak_lr = scaled_lr(optim.base_lr, global_batch)
    lr = cosine_schedule(
        peak_lr, optim.min_lr, total_iters, warmup_iters=epochs_to_iters(optim.warmup_epochs, epoch_length)
    )
    temp_warmup_iters = epochs_to_iters(teacher.warmup_teacher_temp_epochs, epoch_length)
    last_layer_lr = lr.copy()
    # Only the lr is frozen: the last layer's gradients and Adam moments keep flowing meanwhile.
    last_layer_lr[: epochs_to_iters(optim.freeze_last_layer_epochs, epoch_length)] = 0.0
    return Schedules(
        lr=lr,
        weight_decay=cosine_schedule(optim.weight_decay, optim.weight_decay_end, total_iters),
        momentum=cosine_schedule(teacher.momentum_teacher, teacher.final_momentum_teacher, total_iters),
        teacher_temp=cosine_schedule(
            teacher.teacher_temp,
            teacher.teacher_temp,
            temp_warmup_iters,
            warmup_iters=temp_warmup_iters,
            start_warmup_value=teacher.warmup_teacher_temp,
        ),
        last_layer_lr=last_layer_lr,
        final_values={
            "lr": optim.min_lr,
            "weight_decay": optim.weight_decay_end,
            "momentum": teacher.final_momentum_teacher,
            "teacher_temp": teacher.teacher_temp,
            "last_layer_lr": optim.min_lr,
        },
    )


def layer_id(name: str, num_blocks: int) -> int:
    """0 for the embeddings and tokens, i + 1 for block i, num_blocks + 1 for the rest (norm, heads).

    Chunked names `blocks.<chunk>.<i>.` carry the global block index as the inner index.
    """
    parts = name.split(".")
    if EMBEDDING_PARAMS.intersection(parts):
        return 0
    if "blocks" in parts:
        index = parts.index("blocks") + 1
        if index + 1 < len(parts) and parts[index + 1].isdigit():
            index += 1
        return int(parts[index]) + 1
    return num_blocks + 1


def param_multipliers(
    name: str, *, layerwise_decay: float, patch_embed_lr_mult: float, num_blocks: int
) -> tuple[float, float, bool]:
    """(lr_multiplier, wd_multiplier, is_last_layer) of one parameter, from its name (recipe 5.1)."""
    lr_multiplier = layerwise_decay ** (num_blocks + 1 - layer_id(name, num_blocks))
    if "patch_embed" in name.split("."):
        lr_multiplier *= patch_embed_lr_mult
    no_decay = name.endswith(".bias") or any(substring in name for substring in NO_DECAY_SUBSTRINGS)
    return lr_multiplier, 0.0 if no_decay else 1.0, "last_layer" in name


def param_groups(
    modules: Mapping[str, nn.Module], *, layerwise_decay: float, patch_embed_lr_mult: float, num_blocks: int
) -> list[dict[str, Any]]:
    """Trainable parameters of `modules`, fused into one group per (lr_mult, wd_mult, is_last_layer).

    Names are relative to each module (`blocks.3.mlp.fc1.weight`, `last_layer.weight_v`); `num_blocks` is
    the backbone depth L, giving lr multipliers layerwise_decay ** (L + 1 - layer_id). Each group holds
    "params", "lr_multiplier", "wd_multiplier", "is_last_layer" and "names" (same order as "params").
    """
    groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
    for module in modules.values():
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            key = param_multipliers(
                name,
                layerwise_decay=layerwise_decay,
                patch_embed_lr_mult=patch_embed_lr_mult,
                num_blocks=num_blocks,
            )
            group = groups.setdefault(
                key,
                {
                    "params": [],
                    "names": [],
                    "lr_multiplier": key[0],
                    "wd_multiplier": key[1],
                    "is_last_layer": key[2],
                },
            )
            group["params"].append(param)
            group["names"].append(name)
    return list(groups.values())


def build_optimizer(groups: list[dict[str, Any]], betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW over `groups` (eps 1e-8, no amsgrad); lr and weight decay come from `apply_schedules`."""
    return torch.optim.AdamW(groups, betas=betas, foreach=True)


def apply_schedules(optimizer: torch.optim.Optimizer, values: Mapping[str, float]) -> None:
    """Set every group's lr and weight decay for this step from `Schedules.at(step)` values."""
    for group in optimizer.param_groups:
        lr = values["last_layer_lr"] if group["is_last_layer"] else values["lr"]
        group["lr"] = lr * group["lr_multiplier"]
        group["weight_decay"] = values["weight_decay"] * group["wd_multiplier"]


def clip_grad_norms(modules: Mapping[str, nn.Module], max_norm: float) -> dict[str, float]:
    """Clip each module's gradients to global L2 norm `max_norm` (0: no clipping); return pre-clip norms.

    Each module is clipped on its own (backbone, dino_head, ibot_head), never all together. With FSDP2
    the gradients are sharded DTensors, whose norm is reduced over the ranks before it is used.
    """
    norms = {}
    for name, module in modules.items():
        with_grad = [param for param in module.parameters() if param.grad is not None]
        if not with_grad:
            norms[name] = 0.0
            continue
        total_norm = torch.nn.utils.get_total_norm(
            [param.grad for param in with_grad], norm_type=GRAD_NORM_TYPE
        )
        if isinstance(total_norm, DTensor):
            total_norm = total_norm.full_tensor()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, total_norm)
        norms[name] = total_norm.item()
    return norms
