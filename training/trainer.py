"""The one training loop (recipe 4.6): schedules -> forward_backward -> clip -> step -> EMA -> log/checkpoint.

    images manifest --make_train_loader (batch of step s = f(seed, s, rank))--> batch
      --SSLMetaArch.forward_backward--> losses --clip per submodule, AdamW step--> EMA teacher update
      --check_finite (stop naming the term) + health signals--> metrics row
      --every checkpoint_period steps and at the end--> metrics chunk (Parquet), DCP checkpoint

Everything a step does is a function of (weights, optimizer state, centre, step): the batch comes from
the step number, and the torch RNG (stochastic-depth subsets) is reseeded from (seed, step, rank). So a
run resumed from the checkpoint after step k repeats steps k+1.. exactly as an unbroken run does.
The same loop runs under torchrun on N processes and as one plain process (a world of one).
`train_together` runs several models in it on one stream of batches (distillation's students), each
exactly as its own run: a model's step depends on nothing but its own state and the shared batch.
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
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

from pipelines.stage import config_to_dict
from training.checkpoint import (
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    load_initial_weights,
    save_checkpoint,
    step_dir_name,
    write_backbone_options,
    write_run_config,
)
from training.config import PretrainConfig
from training.data.dataset import make_train_loader
from training.health import check_finite
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
from training.run_metrics import drop_metrics_after, read_metrics, write_metrics_chunk
from training.ssl import SSLMetaArch

CHECKPOINTS_DIR = "checkpoints"
# Large odd constants that spread (seed, step, rank) over the RNG seed space without collisions in practice.
STEP_SEED_STRIDE = 1_000_003
RANK_SEED_STRIDE = 7_919


ModelFactory = Callable[[], nn.Module]
FSDP_VIEW_WARNING = r"FSDP2-wrapped module .* returned a view tensor"


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
        if isinstance(modules["backbone"], FSDPModule):
            continue  # shared with a model built before (a frozen teacher of several students): sharded
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


@dataclass(frozen=True, slots=True)
class TrainedModel:
    """One model of a loop: its recipe, its run folder, and what builds it (default: SSLMetaArch(cfg))."""

    cfg: PretrainConfig
    out_dir: Path
    model_factory: ModelFactory | None = None


def loop_settings(cfg: PretrainConfig) -> tuple[Any, ...]:
    """The settings that decide the batches of every step, the steps, and when checkpoints are taken."""
    return (
        cfg.crops,
        cfg.student.patch_size,  # the mask grid
        cfg.ibot.mask_ratio_min_max,
        cfg.ibot.mask_sample_probability,
        cfg.train.seed,
        cfg.train.batch_size_per_gpu,
        cfg.train.num_workers,
        cfg.train.checkpoint_period,
        cfg.train.device,
        cfg.steps_to_run,
    )


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
    (result,) = train_together(
        [TrainedModel(cfg, Path(out_dir), model_factory)],
        images,
        show_progress=show_progress,
        on_step=on_step,
        progress_label=progress_label,
    )
    return result


def train_together(
    models: list[TrainedModel],
    images: pa.Table,
    *,
    show_progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    progress_label: str = "pretrain",
) -> list[TrainResult]:
    """Trains (or resumes) several models on one stream of batches, each exactly as its own `train` run
    would: its weights, optimizer, schedules, checkpoints and metrics in its own folder. They share each
    batch (one loader), and whatever their factories share (distillation: one frozen teacher's outputs).

    Raises:
        ValueError: the recipes disagree on a setting of the shared loop (crops, masks, seed, batch size,
            workers, checkpoint period, device, steps), or no model is given.
    """
    if not models:
        raise ValueError("train_together needs at least one model")
    settings = loop_settings(models[0].cfg)
    if any(loop_settings(model.cfg) != settings for model in models[1:]):
        raise ValueError(
            "models trained together share one batch stream and loop: their recipes must agree on crops, "
            "patch size, ibot masks, train.seed, batch_size_per_gpu, num_workers, checkpoint_period, "
            "device and steps"
        )
    env = init_distributed(models[0].cfg.train.device)
    try:
        with warnings.catch_warnings():
            # Why: the backbone's output dict holds views of one normed tensor (as the official model
            # does); FSDP2 warns in case someone edits them in place, which nothing here does.
            warnings.filterwarnings("ignore", message=FSDP_VIEW_WARNING)
            return _train(models, images, env, show_progress, on_step, progress_label)
    finally:
        shutdown(env)


@dataclass(slots=True)
class _Trainee:
    """A model of the loop with its optimizer, schedules and unsaved metrics rows."""

    cfg: PretrainConfig
    root: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedules: Any
    scaler: torch.amp.GradScaler | None
    start_step: int
    pending: list[dict[str, Any]]

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR


def _trainee(trained: TrainedModel, env: DistributedEnv) -> _Trainee:
    """Builds one model and its optimizer, and resumes it from its newest checkpoint (or its init_from)."""
    cfg, root = trained.cfg, Path(trained.out_dir)
    model = build_model(cfg, env, trained.model_factory)
    if env.is_main:
        write_run_config(root / CHECKPOINTS_DIR, config_to_dict(cfg))
        write_backbone_options(root / CHECKPOINTS_DIR, model.exportable_backbones())
    groups = param_groups(
        {name: module for name, module in model.student.items()},
        layerwise_decay=cfg.optim.layerwise_decay,
        patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult,
        num_blocks=len(model.student["backbone"].blocks),
    )
    optimizer = build_optimizer(groups, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))
    schedules = build_schedules(cfg, global_batch=cfg.train.batch_size_per_gpu * env.world_size)
    start_step = 0
    found = latest_checkpoint(root / CHECKPOINTS_DIR)
    if found is not None:
        start_step = load_checkpoint(found, model, optimizer)
        assert start_step == checkpoint_step(found), f"{found} holds step {start_step}"
    elif cfg.train.init_from:
        load_initial_weights(
            model, cfg.train.init_from, grid=cfg.crops.global_crops_size // cfg.student.patch_size
        )
    model.train()
    return _Trainee(cfg, root, model, optimizer, schedules, loss_scaler(cfg, env), start_step, [])


def _rewind(trainee: _Trainee, step: int) -> None:
    """Loads `trainee`'s checkpoint of `step`: a model saved ahead of the others (killed between saves)
    resumes with them."""
    path = trainee.checkpoints / step_dir_name(step)
    if not path.exists():
        raise RuntimeError(
            f"{trainee.root}: resuming with the models trained alongside it needs its checkpoint of step "
            f"{step}, which is gone (keep_checkpoints); remove the run folders to start again"
        )
    trainee.start_step = load_checkpoint(path, trainee.model, trainee.optimizer)


def _train(
    models: list[TrainedModel],
    images: pa.Table,
    env: DistributedEnv,
    show_progress: bool,
    on_step: Callable[[dict[str, Any]], None] | None,
    progress_label: str,
) -> list[TrainResult]:
    trainees = [_trainee(trained, env) for trained in models]
    start_step = min(trainee.start_step for trainee in trainees)
    for trainee in trainees:
        if trainee.start_step != start_step:
            _rewind(trainee, start_step)
        if env.is_main:
            drop_metrics_after(trainee.root, start_step)
    cfg = trainees[0].cfg  # the loop's settings are every model's (checked by train_together)
    end_step = cfg.steps_to_run
    loader = make_train_loader(
        images,
        cfg,
        rank=env.rank,
        world_size=env.world_size,
        start_step=start_step,
        num_workers=cfg.train.num_workers,
    )
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
        waited = time.perf_counter() - started
        for trainee in trainees:
            started = time.perf_counter()
            values = trainee.schedules.at(step)
            torch.manual_seed(step_seed(trainee.cfg.train.seed, step, env.rank))
            losses, norms = train_step(
                trainee.model, trainee.optimizer, batch, values, trainee.scaler, trainee.cfg.optim.clip_grad
            )
            losses = all_reduce_mean(losses, env)
            check_finite(step, losses, norms)
            row = {
                "step": step,
                **{name: float(value) for name, value in values.items()},
                **losses,
                **{f"grad_norm_{name}": norm for name, norm in norms.items()},
                # Its own step plus the wait for the shared batch (what the step costs it alone).
                "seconds": waited + time.perf_counter() - started,
            }
            trainee.pending.append(row)
            if on_step:
                on_step(row)
        progress.update(1)
        progress.set_postfix(loss=f"{trainees[0].pending[-1]['objective']:.3f}")
        done = step + 1
        if done % cfg.train.checkpoint_period == 0 or done == end_step:
            for trainee in trainees:
                if env.is_main:
                    write_metrics_chunk(trainee.root, trainee.pending)
                trainee.pending = []
                for center in trainee.model.centers():
                    center.flush()
                keep = cfg.train.keep_checkpoints
                save_checkpoint(trainee.checkpoints, done, trainee.model, trainee.optimizer, keep=keep)
    progress.close()
    return [
        TrainResult(
            steps=end_step,
            resumed_from=start_step,
            checkpoint_root=trainee.checkpoints,
            metrics=read_metrics(trainee.root),
        )
        for trainee in trainees
    ]
