"""Schedules against the recipe's reference table (5.4) and closed forms; parameter groups (5.1);
AdamW lr / weight-decay multipliers; per-module gradient clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from training.config import OptimConfig, PretrainConfig, TeacherConfig
from training.models.vit import build_vit
from training.optim import (
    apply_schedules,
    build_optimizer,
    build_schedules,
    clip_grad_norms,
    cosine_schedule,
    param_groups,
    scaled_lr,
    schedule_value,
)

torch.set_num_threads(1)

VITL14_BATCH = 3072
VITL14 = PretrainConfig(
    optim=OptimConfig(epochs=500, warmup_epochs=80, base_lr=2e-4, weight_decay_end=0.2),
    teacher=TeacherConfig(momentum_teacher=0.994),
)
# Recipe 5.4, official CosineScheduler values for vitl14 at batch 3072: it -> (lr, wd, momentum, teacher_temp)
REFERENCE_TABLE = {
    0: (0.0, 0.04, 0.994, 0.04),
    1: (3.4641362565e-09, 0.0400000000, 0.9940000000, 0.0400008000),
    1249: (4.3267061844e-06, 0.0400015766, 0.9940000591, 0.0409992266),
    1250: (4.3301703206e-06, 0.0400015791, 0.9940000592, 0.0410000267),
    99999: (3.4641016151e-04, 0.0498952719, 0.9943710727, 0.07),
    100000: (3.4641016151e-04, 0.0498954656, 0.9943710800, 0.07),
    362500: (1.7370508076e-04, 0.1398951910, 0.9977460697, 0.07),
    624999: (1.0000000031e-06, 0.2, 1.0, 0.07),
}
TABLE_RTOL = 1e-9
TABLE_ATOL = 5e-11  # the table prints 10 decimals: half a unit of the last printed digit
FREEZE_LAST_LAYER_ITERS = 1250
LAYERWISE_DECAY = 0.9
PATCH_EMBED_LR_MULT = 0.2
DEPTH = 12


def test_cosine_schedule_is_freeze_then_warmup_then_cosine():
    base, final, total, warmup, start, freeze = 2.0, 0.5, 12, 4, 0.25, 3
    values = cosine_schedule(
        base, final, total, warmup_iters=warmup, start_warmup_value=start, freeze_iters=freeze
    )
    assert values.dtype == np.float64 and len(values) == total
    cosine_len = total - warmup - freeze
    expected = [0.0] * freeze
    expected += [start + (base - start) * i / (warmup - 1) for i in range(warmup)]
    expected += [
        final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / cosine_len)) for i in range(cosine_len)
    ]
    assert values.tolist() == pytest.approx(expected, rel=1e-15, abs=1e-15)
    assert schedule_value(values, total - 1, final) == expected[-1]
    assert schedule_value(values, total, final) == final
    with pytest.raises(ValueError, match="exceed"):
        cosine_schedule(base, final, 5, warmup_iters=4, freeze_iters=2)


def test_scaled_lr_uses_the_square_root_rule():
    assert scaled_lr(2e-4, 3072) == pytest.approx(3.4641016151e-4, rel=1e-10)
    assert scaled_lr(0.004, 2048) == pytest.approx(0.004 * math.sqrt(2), rel=1e-15)


@pytest.fixture(scope="module")
def vitl14_schedules():
    return build_schedules(VITL14, VITL14_BATCH)


@pytest.mark.parametrize("step", sorted(REFERENCE_TABLE))
def test_schedules_reproduce_the_reference_table(vitl14_schedules, step):
    values = vitl14_schedules.at(step)
    expected = dict(
        zip(("lr", "weight_decay", "momentum", "teacher_temp"), REFERENCE_TABLE[step], strict=True)
    )
    for name, reference in expected.items():
        assert math.isclose(values[name], reference, rel_tol=TABLE_RTOL, abs_tol=TABLE_ATOL), (
            name,
            values[name],
        )
    frozen = step < FREEZE_LAST_LAYER_ITERS
    assert values["last_layer_lr"] == (0.0 if frozen else values["lr"])


def test_schedule_lengths_and_closed_forms(vitl14_schedules):
    total, warmup, temp_iters = 625_000, 100_000, 37_500
    schedules = vitl14_schedules
    assert len(schedules.lr) == len(schedules.weight_decay) == len(schedules.momentum) == total
    assert len(schedules.last_layer_lr) == total and len(schedules.teacher_temp) == temp_iters
    peak = 2e-4 * math.sqrt(3)
    assert schedules.lr[1249] == pytest.approx(peak * 1249 / (warmup - 1), rel=1e-12)
    assert schedules.teacher_temp[1249] == pytest.approx(0.04 + 0.03 * 1249 / (temp_iters - 1), rel=1e-12)
    past_end = schedules.at(total)
    assert past_end == {
        "lr": 1e-6,
        "weight_decay": 0.2,
        "momentum": 1.0,
        "teacher_temp": 0.07,
        "last_layer_lr": 1e-6,
    }
    assert schedules.at(temp_iters)["teacher_temp"] == 0.07


class WeightNormedLinear(nn.Module):
    """Parameter names of the official weight-normed last layer (weight_g, weight_v)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        self.weight_v = nn.Parameter(torch.randn(out_dim, in_dim))


class TinyDinoHead(nn.Module):
    def __init__(self, dim: int = 384, hidden: int = 16, bottleneck: int = 8, prototypes: int = 32):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.last_layer = WeightNormedLinear(bottleneck, prototypes)


def multipliers_by_name(groups: list[dict]) -> dict[str, tuple[float, float, bool]]:
    table = {}
    for group in groups:
        for name in group["names"]:
            table[name] = (group["lr_multiplier"], group["wd_multiplier"], group["is_last_layer"])
    return table


@pytest.fixture(scope="module")
def small_model_groups():
    torch.manual_seed(0)
    modules = {"backbone": build_vit("vit_small"), "dino_head": TinyDinoHead()}
    groups = param_groups(
        modules, layerwise_decay=LAYERWISE_DECAY, patch_embed_lr_mult=PATCH_EMBED_LR_MULT, num_blocks=DEPTH
    )
    return modules, groups


def test_param_groups_multipliers_follow_the_recipe(small_model_groups):
    _, groups = small_model_groups
    table = multipliers_by_name(groups)
    lam = LAYERWISE_DECAY
    expected = {
        "cls_token": (lam**13, 1.0, False),
        "pos_embed": (lam**13, 1.0, False),
        "mask_token": (lam**13, 1.0, False),
        "patch_embed.proj.weight": (lam**13 * PATCH_EMBED_LR_MULT, 1.0, False),
        "patch_embed.proj.bias": (lam**13 * PATCH_EMBED_LR_MULT, 0.0, False),
        "blocks.0.norm1.weight": (lam**12, 0.0, False),
        "blocks.0.attn.qkv.weight": (lam**12, 1.0, False),
        "blocks.0.attn.qkv.bias": (lam**12, 0.0, False),
        "blocks.0.ls1.gamma": (lam**12, 0.0, False),
        "blocks.5.mlp.fc1.weight": (lam**7, 1.0, False),
        "blocks.11.mlp.fc2.weight": (lam, 1.0, False),
        "blocks.11.ls2.gamma": (lam, 0.0, False),
        "norm.weight": (1.0, 0.0, False),
        "norm.bias": (1.0, 0.0, False),
        "mlp.0.weight": (1.0, 1.0, False),
        "mlp.2.bias": (1.0, 0.0, False),
        "last_layer.weight_g": (1.0, 1.0, True),
        "last_layer.weight_v": (1.0, 1.0, True),
    }
    for name, (lr_mult, wd_mult, is_last) in expected.items():
        got = table[name]
        assert got[0] == pytest.approx(lr_mult, rel=1e-12) and got[1:] == (wd_mult, is_last), name


def test_param_groups_are_fused_and_cover_every_trainable_parameter_once(small_model_groups):
    modules, groups = small_model_groups
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert len(keys) == len(set(keys))
    # 12 blocks x (decay, no decay) + tokens + patch_embed x 2 + final norm/head x 2 + last layer
    assert len(groups) == 2 * DEPTH + 1 + 2 + 2 + 1
    grouped = [id(p) for g in groups for p in g["params"]]
    every = [id(p) for module in modules.values() for p in module.parameters()]
    assert sorted(grouped) == sorted(every)
    assert all(len(g["params"]) == len(g["names"]) for g in groups)


def test_param_groups_parse_chunked_block_names_and_skip_frozen_parameters():
    chunk0 = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    chunk1 = nn.ModuleList([nn.Identity(), nn.Identity(), nn.Linear(2, 2), nn.Linear(2, 2)])
    backbone = nn.Module()
    backbone.blocks = nn.ModuleList([chunk0, chunk1])
    backbone.cls_token = nn.Parameter(torch.zeros(1, 1, 2), requires_grad=False)
    groups = param_groups({"backbone": backbone}, layerwise_decay=0.5, patch_embed_lr_mult=1.0, num_blocks=4)
    table = multipliers_by_name(groups)
    assert "cls_token" not in table
    assert table["blocks.0.0.weight"][0] == 0.5**4  # block 0 -> layer 1
    assert table["blocks.1.3.weight"][0] == 0.5  # inner index 3 is the global block index
    assert table["blocks.1.2.bias"] == (0.5**2, 0.0, False)


def test_apply_schedules_sets_lr_and_weight_decay_and_adamw_uses_them():
    first = nn.Linear(1, 1, bias=False)
    last = nn.Module()
    last.last_layer = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        first.weight.fill_(2.0)
        last.last_layer.weight.fill_(3.0)
    groups = param_groups(
        {"backbone": first, "head": last}, layerwise_decay=0.5, patch_embed_lr_mult=1.0, num_blocks=1
    )
    optimizer = build_optimizer(groups, betas=(0.9, 0.999))
    values = {"lr": 0.1, "last_layer_lr": 0.01, "weight_decay": 0.2, "momentum": 0.99, "teacher_temp": 0.05}
    apply_schedules(optimizer, values)
    by_last = {g["is_last_layer"]: g for g in optimizer.param_groups}
    assert by_last[False]["lr"] == pytest.approx(0.1) and by_last[True]["lr"] == pytest.approx(0.01)
    assert by_last[False]["weight_decay"] == pytest.approx(0.2)

    first.weight.grad = torch.tensor([[0.5]])
    last.last_layer.weight.grad = torch.tensor([[-4.0]])
    optimizer.step()
    # first AdamW step: p <- p (1 - lr wd) - lr g / (|g| + eps), since bias-corrected m / sqrt(v) = g / |g|
    eps = 1e-8
    assert first.weight.item() == pytest.approx(2.0 * (1 - 0.1 * 0.2) - 0.1 * 0.5 / (0.5 + eps), rel=1e-6)
    assert last.last_layer.weight.item() == pytest.approx(
        3.0 * (1 - 0.01 * 0.2) + 0.01 * 4 / (4 + eps), rel=1e-6
    )


def modules_with_grads() -> dict[str, nn.Module]:
    backbone, head = nn.Linear(2, 1, bias=False), nn.Linear(1, 1, bias=False)
    backbone.weight.grad = torch.tensor([[3.0, 4.0]])  # norm 5
    head.weight.grad = torch.tensor([[0.5]])  # norm 0.5
    return {"backbone": backbone, "dino_head": head, "ibot_head": nn.Identity()}


def test_clip_grad_norms_clips_each_module_on_its_own():
    modules = modules_with_grads()
    norms = clip_grad_norms(modules, max_norm=1.0)
    assert norms == pytest.approx({"backbone": 5.0, "dino_head": 0.5, "ibot_head": 0.0})
    scale = 1.0 / (5.0 + 1e-6)
    assert modules["backbone"].weight.grad[0].tolist() == pytest.approx([3.0 * scale, 4.0 * scale])
    assert modules["dino_head"].weight.grad.item() == 0.5  # under the limit: untouched


def test_clip_grad_norms_with_zero_max_norm_only_reports():
    modules = modules_with_grads()
    norms = clip_grad_norms(modules, max_norm=0.0)
    assert norms["backbone"] == pytest.approx(5.0)
    assert modules["backbone"].weight.grad.tolist() == [[3.0, 4.0]]
