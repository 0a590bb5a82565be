"""The `distill` stage: a smaller student from the frozen pretrained teacher, as a step of curate-and-train.

curated manifest + exports (the teacher: its checkpoint with heads, or a user's hub backbone file)
  --distill (the training loop with DistillMetaArch; torchrun for nproc_per_node > 1)-->
  `metrics` (one row per step), `exports` (teacher, student = the student's EMA, and
  student_random_init = the student's exact initial weights, the evaluation baseline),
  artifacts: student.pth, student_random_init.pth (+ .json build options), loss_curve.png
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from distillation.config import DistillConfig
from distillation.meta_arch import DistillMetaArch, Objective
from distillation.teacher import (
    FrozenTeacher,
    is_checkpoint,
    load_checkpoint_teacher,
    load_hub_teacher,
    read_hub_backbone,
)
from pipelines.manifest import CURATED
from pipelines.stage import ARTIFACTS_DIR, Manifest, StageContext, StageSpec, register_stage
from training.checkpoint import backbone_options, export_backbone
from training.exports import EXPORTS, export_row, read_exports, save_backbone
from training.ssl import build_backbone
from training.stages import (
    RUN_DIR,
    TEACHER_MODEL,
    TRAINING_SHOWN_STATS,
    finish_training,
    launch_torchrun,
    nothing_to_train,
)
from training.trainer import CHECKPOINTS_DIR, TRAIN_METRICS, train

STUDENT_MODEL = "student"
RANDOM_INIT_MODEL = "student_random_init"
STUDENT_FILE = "student.pth"
RANDOM_INIT_FILE = "student_random_init.pth"


def teacher_source(cfg: DistillConfig, exports: list[dict[str, Any]]) -> tuple[Path, dict[str, Any] | None]:
    """Where the teacher comes from: the configured path, or the pretrain stage's teacher export
    (its checkpoint when it has one, for the heads). Also the exports row to pass on, if any."""
    if cfg.teacher_source:
        return Path(cfg.teacher_source), None
    rows = [row for row in exports if row["model"] == TEACHER_MODEL]
    if len(rows) != 1:
        raise ValueError(f"distill: expected one {TEACHER_MODEL!r} row in the exports input, got {len(rows)}")
    row = rows[0]
    return Path(row["checkpoint"] or row["path"]), row


def resolve_objective(cfg: DistillConfig, source: Path) -> Objective:
    if cfg.objective != "auto":
        return cfg.objective
    return "heads" if is_checkpoint(source) else "features"


def load_teacher(cfg: DistillConfig, source: Path, objective: Objective) -> FrozenTeacher:
    if is_checkpoint(source):
        return load_checkpoint_teacher(source)
    return load_hub_teacher(source, cfg, with_heads=objective == "heads")


def distill(cfg: DistillConfig, images, run_dir: Path, *, show_progress: bool = True) -> None:
    """One process's distillation run (also the torchrun entry point's body)."""
    source = Path(cfg.teacher_source)
    objective = resolve_objective(cfg, source)
    teacher = load_teacher(cfg, source, objective)
    train(
        cfg.recipe,
        images,
        run_dir,
        show_progress=show_progress,
        model_factory=lambda: DistillMetaArch(cfg, teacher, objective),
        progress_label="distill",
    )


def save_random_init(cfg: DistillConfig, path: Path) -> Path:
    """The student backbone exactly as training starts it (same seed, same build order)."""
    recipe = cfg.recipe
    torch.manual_seed(recipe.train.seed)
    backbone = build_backbone(recipe, drop_path_rate=0.0)
    return save_backbone(backbone, backbone_options(recipe.student, recipe.crops.global_crops_size), path)


def teacher_row(
    teacher_export: dict[str, Any] | None, source: Path, artifacts: Path, cfg: DistillConfig
) -> dict:
    """The teacher's exports row: passed on from pretraining, or made for a user-given teacher."""
    if teacher_export is not None:
        return teacher_export
    if is_checkpoint(source):
        out = export_backbone(source, artifacts / "teacher.pth")
        return export_row(TEACHER_MODEL, out, checkpoint=source)
    return export_row(TEACHER_MODEL, source, options=read_hub_backbone(source, cfg)[1])


def run_distill(cfg: DistillConfig, inputs: Mapping[str, Manifest], ctx: StageContext) -> dict[str, Any]:
    images = inputs["curated"].read(CURATED)
    if images.num_rows == 0:
        return nothing_to_train(ctx, ctx.spec.name)
    source, teacher_export = teacher_source(cfg, read_exports(inputs["exports"]))
    resolved = dataclasses.replace(cfg, teacher_source=str(source))
    run_dir = ctx.local_dir(RUN_DIR)
    artifacts = ctx.local_dir(ARTIFACTS_DIR)
    save_random_init(cfg, artifacts / RANDOM_INIT_FILE)
    processes = cfg.recipe.train.nproc_per_node
    if processes == 1:
        distill(resolved, images, run_dir, show_progress=ctx.show_progress)
    else:
        launch_torchrun("distillation.launch", resolved, processes, inputs["curated"].uri, run_dir)
    student = export_backbone(run_dir / CHECKPOINTS_DIR, artifacts / STUDENT_FILE, module="student_ema")
    rows = [
        teacher_row(teacher_export, source, artifacts, cfg),
        export_row(STUDENT_MODEL, student, checkpoint=run_dir / CHECKPOINTS_DIR),
        export_row(RANDOM_INIT_MODEL, artifacts / RANDOM_INIT_FILE),
    ]
    stats = finish_training(ctx, run_dir, rows, f"distill {cfg.recipe.student.arch}")
    return {
        **stats,
        "images": images.num_rows,
        "objective": resolve_objective(cfg, source),
        "teacher": str(source),
        "parameters": {row["model"]: row["parameters"] for row in rows},
    }


DISTILL = register_stage(
    StageSpec(
        name="distill",
        # 4: the DINO/iBOT cross-entropy and Sinkhorn-Knopp sum in another order (same maths, other last bits)
        # 3: exports name files inside the store relative to the manifest (movable stores)
        version=4,
        config_type=DistillConfig,
        fn=run_distill,
        inputs={"curated": CURATED, "exports": EXPORTS},
        outputs={"metrics": TRAIN_METRICS, "exports": EXPORTS},
        description="a smaller student distilled from the frozen teacher; the student's EMA is exported",
        shown_stats=TRAINING_SHOWN_STATS,
    )
)
