"""One rank of the FSDP2 equivalence check; run under torchrun (see test_fsdp_torchrun.py).

Every rank builds the same sharded model, takes its slice of one fixed global batch, runs one
forward_backward and writes (rank 0) the mean logged losses, the full student gradients and how many
parameters each rank holds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tests.training_helpers import tiny_pretrain_config
from training.optim import build_schedules
from training.parallel import all_reduce_mean, init_distributed, leave_rank, local_tensor, shutdown
from training.trainer import build_model

GLOBAL_IMAGES = 8
BATCH_SEED = 1234
STEP = 1  # lr > 0 after the one-step warmup


def global_batch(cfg, images: int) -> dict[str, torch.Tensor]:
    """Crop-major crops of `images` images, identical in every process (fixed seed)."""
    generator = torch.Generator().manual_seed(BATCH_SEED)
    crops = cfg.crops
    views = torch.randn(2, images, 3, crops.global_crops_size, crops.global_crops_size, generator=generator)
    locals_ = torch.randn(
        crops.local_crops_number,
        images,
        3,
        crops.local_crops_size,
        crops.local_crops_size,
        generator=generator,
    )
    return {"views": views, "locals": locals_}


def rank_batch(full: dict[str, torch.Tensor], rank: int, world: int, patches: int) -> dict[str, torch.Tensor]:
    per_rank = full["views"].shape[1] // world
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    views, locals_ = full["views"][:, part], full["locals"][:, part]
    return {
        "collated_global_crops": views.flatten(0, 1),
        "collated_local_crops": locals_.flatten(0, 1),
        "collated_masks": torch.zeros(2 * per_rank, patches, dtype=torch.bool),
        "mask_indices_list": torch.zeros(0, dtype=torch.long),
        "masks_weight": torch.zeros(0),
        "n_masked_patches": torch.zeros(1, dtype=torch.long),
        "upperbound": 0,
    }


def main(out_path: str) -> None:
    cfg = tiny_pretrain_config(
        student={"drop_path_rate": 0.0},
        dino={"koleo_loss_weight": 0.0},  # KoLeo's neighbours are per-rank by design (recipe 4.3)
        ibot={"mask_sample_probability": 0.0},
        train={"centering": "sinkhorn_knopp"},
    )
    env = init_distributed("cpu")
    model = build_model(cfg, env)
    model.train()
    values = build_schedules(cfg, global_batch=cfg.train.batch_size_per_gpu * env.world_size).at(STEP)
    patches = (cfg.crops.global_crops_size // cfg.student.patch_size) ** 2
    batch = rank_batch(global_batch(cfg, GLOBAL_IMAGES), env.rank, env.world_size, patches)
    losses = all_reduce_mean(model.forward_backward(batch, values["teacher_temp"]), env)
    gradients = {name: p.grad.full_tensor() for name, p in model.student.named_parameters()}
    held = sum(local_tensor(p).numel() for p in model.student.parameters())
    total = sum(p.numel() for p in model.student.parameters())
    held_by_rank = all_reduce_mean(
        {f"held_{r}": float(held if r == env.rank else 0) for r in range(env.world_size)}, env
    )
    if env.is_main:
        torch.save(gradients, Path(out_path).with_suffix(".pt"))
        shares = {name: value * env.world_size / total for name, value in held_by_rank.items()}
        Path(out_path).write_text(json.dumps({"losses": losses, "held_share": shares}))
    shutdown(env)


if __name__ == "__main__":
    main(sys.argv[1])
    leave_rank()
