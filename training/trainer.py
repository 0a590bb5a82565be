"""The one training loop (recipe 4.6): schedules -> forward_backward -> clip -> step -> EMA -> log/checkpoint.

    images manifest --make_train_loader (batch of step s = f(seed, s, rank))--> batch
      --SSLMetaArch.forward_backward--> losses --clip per submodule, AdamW step--> EMA teacher update
      --check_finite (stop naming the term) + health signals--> metrics row
      --every checkpoint_period steps and at the end--> metrics chunk (Parquet), DCP checkpoint

Everything a step does is a function of (weights, optimizer state, centre, step): the batch comes from
the step number, and the torch RNG (stochastic-depth subsets) is reseeded from (seed, step, rank). So a
run resumed from the checkpoint after step k repeats steps k+1.. exactly as an unbroken run does.
The same loop runs under torchrun on N processes and as one plain process (a world of one).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from tqdm import tqdm

from pipelines.manifest import ManifestSchema
from pipelines.stage import config_to_dict
from training.checkpoint import (
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    load_initial_weights,
    save_checkpoint,
    write_backbone_options,
    write_run_config,
)
from training.config import PretrainConfig
from training.data.dataset import make_train_loader
from training.health import HEALTH_COLUMNS, check_finite
from training.optim import apply_schedules, build_optimizer, build_schedules, clip_grad_norms, param_groups
from training.parallel import (
    DistributedEnv,
    all_reduce_mean,
    compute_dtype,
    init_distributed,
    shard_backbone,
    shard_head,
    shutdown,
)
from training.ssl import SSLMetaArch

CHECKPOINTS_DIR = "checkpoints"
METRICS_DIR = "metrics"
METRICS_CHUNK = "steps_{first:08d}_{last:08d}.parquet"
# Large odd constants that spread (seed, step, rank) over the RNG seed space without collisions in practice.
STEP_SEED_STRIDE = 1_000_003
RANK_SEED_STRIDE = 7_919


ModelFactory = Callable[[], nn.Module]
FSDP_VIEW_WARNING = r"FSDP2-wrapped module .* returned a view tensor"


def _float_fields(*names: str, nullable: bool = False) -> tuple[pa.Field, ...]:
    return tuple(pa.field(name, pa.float64(), nullable=nullable) for name in names)


# One row per training iteration: the schedules' values, every loss term (official logged names, plus the
# optimised objective), the gradient norm of each student submodule before clipping, the health signals
# (training/health.py) and the step time.
# Version 2: every head's gradient norm is nullable. Version 3: the health signals.
TRAIN_METRICS = ManifestSchema(
    name="train_metrics",
    version=3,
    fields=(
        pa.field("step", pa.int64(), nullable=False),
        *_float_fields("lr", "weight_decay", "momentum", "teacher_temp", "last_layer_lr"),
        *_float_fields(
            "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "objective"
        ),
        *_float_fields("grad_norm_backbone"),
        # One per student head: DINO (and a separate iBOT) head, or distillation's feature projection.
        *_float_fields("grad_norm_dino_head", "grad_norm_ibot_head", "grad_norm_feature_head", nullable=True),
        # Prototype signals are null for objectives without prototypes (feature distillation).
        *_float_fields(*HEALTH_COLUMNS, nullable=True),
        *_float_fields("seconds"),
    ),
)


@dataclass(frozen=True, slots=True)
class TrainResult:
    steps: int
    """Iterations done in total (including those of earlier, resumed runs)."""
    resumed_from: int
    checkpoint_root: Path
    metrics: pa.Table


def step_seed(seed: int, step: int, rank: int) -> int:
    return seed + STEP_SEED_STRIDE * (step + 1) + RANK_SEED_STRIDE * rank


def build_model(cfg: PretrainConfig, env: DistributedEnv, factory: ModelFactory | None = None) -> nn.Module:
    """The meta-architecture with every model part sharded the same way (the EMA pairs their shards)."""
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = factory() if factory else SSLMetaArch(cfg)
    dtype = compute_dtype(cfg.train.precision, env.device)
    for modules in model.shard_groups():
        shard_backbone(modules["backbone"], env.mesh, dtype)
        for name, head in modules.items():
            if name != "backbone":
                shard_head(head, env.mesh, dtype)
    return model.to(env.device)


def loss_scaler(cfg: PretrainConfig, env: DistributedEnv) -> torch.amp.GradScaler | None:
    """Dynamic loss scaling for fp16 on CUDA only (bf16 and fp32 have the range and need none)."""
    if cfg.train.precision == "fp16" and env.device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    values: dict[str, float],
    scaler: torch.amp.GradScaler | None,
    clip_grad: float,
) -> tuple[dict[str, float], dict[str, float]]:
    """One iteration (recipe 4.6): schedules, forward_backward, unscale, clip per submodule, step, EMA.

    The EMA runs also when the fp16 scaler skipped the step, as the official loop does. Returns this
    rank's losses and the pre-clip gradient norms.
    """
    apply_schedules(optimizer, values)
    optimizer.zero_grad(set_to_none=True)
    backward = (lambda loss: scaler.scale(loss).backward()) if scaler else torch.Tensor.backward
    losses = model.forward_backward(batch, values["teacher_temp"], backward)
    if scaler:
        scaler.unscale_(optimizer)
    norms = clip_grad_norms(dict(model.student.items()), clip_grad)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    model.update_ema(values["momentum"])
    return losses, norms


def write_metrics_chunk(root: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    directory = root / METRICS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / METRICS_CHUNK.format(first=rows[0]["step"], last=rows[-1]["step"])
    temp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    pq.write_table(TRAIN_METRICS.table_from_rows(rows), temp)
    os.replace(temp, path)


def drop_metrics_after(root: Path, step: int) -> None:
    """Removes chunks of steps a resumed run will redo (written just before a save that never landed)."""
    for path in (root / METRICS_DIR).glob("steps_*.parquet"):
        if int(path.stem.rsplit("_", 1)[1]) >= step:
            path.unlink()


def read_metrics(root: Path) -> pa.Table:
    paths = sorted((root / METRICS_DIR).glob("steps_*.parquet"))
    if not paths:
        return TRAIN_METRICS.empty_table()
    return pa.concat_tables([pq.read_table(path) for path in paths]).sort_by("step")


def train(
    cfg: PretrainConfig,
    images: pa.Table,
    out_dir: str | os.PathLike,
    *,
    show_progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    model_factory: ModelFactory | None = None,
    progress_label: str = "pretrain",
) -> TrainResult:
    """Trains (or resumes) a run in `out_dir` up to `cfg.steps_to_run` iterations.

    `model_factory` builds the meta-architecture (default: DINOv2 self-supervised `SSLMetaArch(cfg)`;
    distillation passes its own, and its `progress_label`). It must offer `student`, `shard_groups()`,
    `forward_backward`, `update_ema`, `centers()` and `exportable_backbones()`.
    """
    env = init_distributed(cfg.train.device)
    try:
        with warnings.catch_warnings():
            # Why: the backbone's output dict holds views of one normed tensor (as the official model
            # does); FSDP2 warns in case someone edits them in place, which nothing here does.
            warnings.filterwarnings("ignore", message=FSDP_VIEW_WARNING)
            return _train(
                cfg, images, Path(out_dir), env, show_progress, on_step, model_factory, progress_label
            )
    finally:
        shutdown(env)


def _train(
    cfg: PretrainConfig,
    images: pa.Table,
    root: Path,
    env: DistributedEnv,
    show_progress: bool,
    on_step: Callable[[dict[str, Any]], None] | None,
    model_factory: ModelFactory | None,
    progress_label: str,
) -> TrainResult:
    checkpoints = root / CHECKPOINTS_DIR
    model = build_model(cfg, env, model_factory)
    if env.is_main:
        write_run_config(checkpoints, config_to_dict(cfg))
        write_backbone_options(checkpoints, model.exportable_backbones())
    groups = param_groups(
        {name: module for name, module in model.student.items()},
        layerwise_decay=cfg.optim.layerwise_decay,
        patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult,
        num_blocks=len(model.student["backbone"].blocks),
    )
    optimizer = build_optimizer(groups, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))
    schedules = build_schedules(cfg, global_batch=cfg.train.batch_size_per_gpu * env.world_size)

    start_step = 0
    found = latest_checkpoint(checkpoints)
    if found is not None:
        start_step = load_checkpoint(found, model, optimizer)
        assert start_step == checkpoint_step(found), f"{found} holds step {start_step}"
    elif cfg.train.init_from:
        load_initial_weights(
            model, cfg.train.init_from, grid=cfg.crops.global_crops_size // cfg.student.patch_size
        )
    if env.is_main:
        drop_metrics_after(root, start_step)

    end_step = cfg.steps_to_run
    model.train()
    scaler = loss_scaler(cfg, env)
    loader = make_train_loader(
        images,
        cfg,
        rank=env.rank,
        world_size=env.world_size,
        start_step=start_step,
        num_workers=cfg.train.num_workers,
    )
    pending: list[dict[str, Any]] = []
    progress = tqdm(
        total=end_step,
        initial=start_step,
        desc=progress_label,
        unit="step",
        disable=not (show_progress and env.is_main),
    )
    for step in range(start_step, end_step):
        started = time.perf_counter()
        batch = next(loader)
        values = schedules.at(step)
        torch.manual_seed(step_seed(cfg.train.seed, step, env.rank))
        losses, norms = train_step(model, optimizer, batch, values, scaler, cfg.optim.clip_grad)
        losses = all_reduce_mean(losses, env)
        check_finite(step, losses, norms)
        row = {
            "step": step,
            **{name: float(value) for name, value in values.items()},
            **losses,
            **{f"grad_norm_{name}": norm for name, norm in norms.items()},
            "seconds": time.perf_counter() - started,
        }
        pending.append(row)
        if on_step:
            on_step(row)
        progress.update(1)
        progress.set_postfix(loss=f"{losses['objective']:.3f}")
        done = step + 1
        if done % cfg.train.checkpoint_period == 0 or done == end_step:
            if env.is_main:
                write_metrics_chunk(root, pending)
            pending = []
            for center in model.centers():
                center.flush()
            save_checkpoint(checkpoints, done, model, optimizer, keep=cfg.train.keep_checkpoints)
    progress.close()
    return TrainResult(
        steps=end_step, resumed_from=start_step, checkpoint_root=checkpoints, metrics=read_metrics(root)
    )
