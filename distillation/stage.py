"""The `distill` stage: smaller students from the frozen pretrained teacher, as a step of curate-and-train.

curated manifest + exports (the teacher: its checkpoint with heads, or a user's hub backbone file)
  --distill (the training loop with one DistillMetaArch per student on one batch stream, the teacher run
    once per batch for all; torchrun for nproc_per_node > 1)-->
  `metrics` (one row per step and student), `exports` (teacher; per student its EMA and its exact
  initial weights, the evaluation baseline: `student` and `student_random_init` for a single student,
  `<name>` and `<name>_random_init` for each of `students`),
  artifacts: those backbones as .pth (+ .json build options), loss and health curves per student
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from distillation.config import RANDOM_INIT_SUFFIX, SINGLE_STUDENT, DistillConfig
from distillation.meta_arch import DistillMetaArch, Objective, SharedTeacherOutputs
from distillation.teacher import (
    FrozenTeacher,
    is_checkpoint,
    load_checkpoint_teacher,
    load_hub_teacher,
    read_hub_backbone,
)
from pipelines.manifest import CURATED, ManifestSchema
from pipelines.stage import ARTIFACTS_DIR, Manifest, StageContext, StageSpec, register_stage
from training.checkpoint import backbone_options, export_backbone
from training.config import PretrainConfig
from training.exports import EXPORTS, export_row, exports_table, read_exports, save_backbone
from training.run_metrics import TRAIN_METRICS, read_metrics
from training.ssl import build_backbone
from training.stages import (
    RUN_DIR,
    TEACHER_MODEL,
    TRAINING_SHOWN_STATS,
    launch_torchrun,
    nothing_to_train,
    write_curves,
)
from training.trainer import CHECKPOINTS_DIR, TrainedModel, train_together

STUDENT_MODEL = "student"
RANDOM_INIT_MODEL = "student_random_init"
# One row per step and student: the training metrics, and the student (its exports' model name).
DISTILL_METRICS = ManifestSchema(
    name="distill_metrics",
    version=1,
    fields=(*TRAIN_METRICS.fields, pa.field("model", pa.string(), nullable=False)),
)


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


def student_names(cfg: DistillConfig) -> dict[str, tuple[str, str]]:
    """Student -> the model names of its two exports (distilled, random init): `student` and
    `student_random_init` for a single student, as before there were several; else its name and name +
    `_random_init`."""
    if not cfg.students:
        return {SINGLE_STUDENT: (STUDENT_MODEL, RANDOM_INIT_MODEL)}
    return {entry.name: (entry.name, f"{entry.name}{RANDOM_INIT_SUFFIX}") for entry in cfg.students}


def student_run_dir(cfg: DistillConfig, run_dir: Path, name: str) -> Path:
    """A student's checkpoints and metrics: the run folder itself for a single student."""
    return run_dir if not cfg.students else run_dir / name


def distill(cfg: DistillConfig, images, run_dir: Path, *, show_progress: bool = True) -> None:
    """One process's distillation run (also the torchrun entry point's body): every student of `cfg`
    on one batch stream, the frozen teacher run once per batch for all of them."""
    source = Path(cfg.teacher_source)
    objective = resolve_objective(cfg, source)
    teacher = load_teacher(cfg, source, objective)
    recipes = cfg.student_recipes()
    shared = SharedTeacherOutputs(len(recipes)) if len(recipes) > 1 else None
    models = [
        TrainedModel(
            recipe,
            student_run_dir(cfg, run_dir, name),
            functools.partial(
                DistillMetaArch,
                dataclasses.replace(cfg, recipe=recipe, students=()),
                teacher,
                objective,
                shared,
            ),
        )
        for name, recipe in recipes.items()
    ]
    train_together(models, images, show_progress=show_progress, progress_label="distill")


def save_random_init(recipe: PretrainConfig, path: Path) -> Path:
    """The student backbone exactly as training starts it (same seed, same build order)."""
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


def student_metrics(name: str, run_dir: Path) -> pa.Table:
    metrics = TRAIN_METRICS.validate(read_metrics(run_dir))
    return DISTILL_METRICS.validate(metrics.append_column("model", pa.array([name] * metrics.num_rows)))


def run_distill(cfg: DistillConfig, inputs: Mapping[str, Manifest], ctx: StageContext) -> dict[str, Any]:
    images = inputs["curated"].read(CURATED)
    if images.num_rows == 0:
        return nothing_to_train(ctx, ctx.spec.name, DISTILL_METRICS)
    source, teacher_export = teacher_source(cfg, read_exports(inputs["exports"]))
    resolved = dataclasses.replace(cfg, teacher_source=str(source))
    run_dir = ctx.local_dir(RUN_DIR)
    artifacts = ctx.local_dir(ARTIFACTS_DIR)
    recipes = cfg.student_recipes()
    names = student_names(cfg)
    for name, recipe in recipes.items():
        save_random_init(recipe, artifacts / f"{names[name][1]}.pth")
    processes = cfg.recipe.train.nproc_per_node
    if processes == 1:
        distill(resolved, images, run_dir, show_progress=ctx.show_progress)
    else:
        launch_torchrun("distillation.launch", resolved, processes, inputs["curated"].uri, run_dir)
    rows = [teacher_row(teacher_export, source, artifacts, cfg)]
    per_student: dict[str, Any] = {}
    metrics = []
    for name, recipe in recipes.items():
        model, random_init = names[name]
        checkpoints = student_run_dir(cfg, run_dir, name) / CHECKPOINTS_DIR
        student = export_backbone(checkpoints, artifacts / f"{model}.pth", module="student_ema")
        rows.append(export_row(model, student, checkpoint=checkpoints))
        rows.append(export_row(random_init, artifacts / f"{random_init}.pth"))
        metrics.append(student_metrics(model, checkpoints.parent))
        suffix = "" if not cfg.students else f"_{name}"
        per_student[name] = write_curves(ctx, metrics[-1], f"distill {recipe.student.arch} ({model})", suffix)
    ctx.write_output("metrics", pa.concat_tables(metrics))
    ctx.write_output("exports", exports_table(rows, ctx.output_uri("exports"), ctx.store.root))
    first = next(iter(per_student.values()))
    return {
        **first,  # the first student's, for the summaries (each student's are under `students`)
        "students": per_student,
        "images": images.num_rows,
        "objective": resolve_objective(cfg, source),
        "teacher": str(source),
        "parameters": {row["model"]: row["parameters"] for row in rows},
    }


DISTILL = register_stage(
    StageSpec(
        name="distill",
        # 5: several students (`students`), one teacher forward per batch; metrics name their model
        # 4: the DINO/iBOT cross-entropy and Sinkhorn-Knopp sum in another order (same maths, other last bits)
        # 3: exports name files inside the store relative to the manifest (movable stores)
        version=5,
        config_type=DistillConfig,
        fn=run_distill,
        inputs={"curated": CURATED, "exports": EXPORTS},
        outputs={"metrics": DISTILL_METRICS, "exports": EXPORTS},
        description="smaller students distilled from the frozen teacher; each student's EMA is exported",
        shown_stats=TRAINING_SHOWN_STATS,
    )
)
