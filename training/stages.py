"""The `pretrain` stage: DINOv2 pretraining on the curated manifest, as one step of curate-and-train.

    curated manifest --train (this process, or torchrun with nproc_per_node processes)-->
      <stage dir>/run/checkpoints (DCP, resumable) + run/metrics chunks
      --> `metrics` manifest (one row per step), artifacts/backbone.pth (+ .json build options),
          `exports` manifest (one row: the teacher backbone), artifacts/loss_curve.png, health.png

A killed stage resumes from its newest checkpoint the next time it runs (same key, same folder).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.manifest import CURATED, ManifestSchema
from pipelines.stage import (
    ARTIFACTS_DIR,
    Manifest,
    StageContext,
    StageRun,
    StageSpec,
    config_to_dict,
    register_stage,
)
from pipelines.views import FigureView
from training.checkpoint import export_backbone
from training.config import PretrainConfig
from training.eval.pca_picture import pca_picture_png, spread_images
from training.exports import EXPORTS, export_row, exports_table, load_exported_backbone, read_exports
from training.health import HEALTH_COLUMNS
from training.plots import health_curve_png, loss_curve_png
from training.run_metrics import TRAIN_METRICS, read_metrics
from training.trainer import CHECKPOINTS_DIR, train

RUN_DIR = "run"
BACKBONE_FILE = "backbone.pth"
LOSS_CURVE_STEM = "loss_curve"  # artifacts: loss_curve.png, health.png (+ a student's name when several)
HEALTH_CURVE_STEM = "health"
CONFIG_FILE = "launch_config.json"
TEACHER_MODEL = "teacher"  # pretraining exports its EMA teacher, the model DINOv2 releases
PCA_IMAGE_COUNT = 6
# What the summaries of both training stages show: stats key -> label.
TRAINING_SHOWN_STATS = {
    "steps": "steps",
    "images": "images",
    "objective_first": "first objective",
    "objective_last": "last objective",
    "seconds_per_step": "s / step",
}


def launch_torchrun(entry_module: str, section: Any, processes: int, images_uri: str, run_dir: Path) -> None:
    """Runs `python -m entry_module` on `processes` local ranks and waits; a failed rank fails the stage.

    `section` (a config dataclass) travels as JSON; the entry point validates it again.
    """
    config_path = run_dir / CONFIG_FILE
    config_path.write_text(json.dumps(config_to_dict(section)))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        "-m",
        entry_module,
        "--config",
        str(config_path),
        "--images",
        images_uri,
        "--out",
        str(run_dir),
    ]
    subprocess.run(command, check=True)


def nothing_to_train(
    ctx: StageContext, stage: str, metrics_schema: ManifestSchema = TRAIN_METRICS
) -> dict[str, Any]:
    """Commits empty outputs for a training stage given no images, and says so in its stats."""
    ctx.write_output("metrics", metrics_schema.empty_table())
    ctx.write_output("exports", EXPORTS.empty_table())
    ctx.warn(f"{stage}: the curated manifest is empty; nothing trained")
    return {"steps": 0, "images": 0}


def finish_training(
    ctx: StageContext, run_dir: Path, exports: list[dict[str, Any]], title: str
) -> dict[str, Any]:
    """The tail of both training stages: writes the run's `metrics` and `exports` outputs and its loss
    curve, and returns the stats they share."""
    metrics = TRAIN_METRICS.validate(read_metrics(run_dir))
    ctx.write_output("metrics", metrics)
    ctx.write_output("exports", exports_table(exports, ctx.output_uri("exports"), ctx.store.root))
    return write_curves(ctx, metrics, title)


def write_curves(ctx: StageContext, metrics: pa.Table, title: str, suffix: str = "") -> dict[str, Any]:
    """A run's loss and health curves as artifacts (file names + `suffix`), and its metrics' stats."""
    ctx.write_artifact(f"{LOSS_CURVE_STEM}{suffix}.png", loss_curve_png(metrics, title))
    ctx.write_artifact(f"{HEALTH_CURVE_STEM}{suffix}.png", health_curve_png(metrics, f"{title}: health"))
    objective = metrics.column("objective")
    return {
        "steps": metrics.num_rows,
        "objective_first": objective[0].as_py(),
        "objective_last": objective[-1].as_py(),
        "seconds_per_step": round(pc.mean(metrics.column("seconds")).as_py(), 4),
        "health_last": {name: metrics.column(name)[-1].as_py() for name in HEALTH_COLUMNS},
    }


def train_teacher(
    cfg: PretrainConfig,
    images: pa.Table,
    images_uri: str,
    run_dir: Path,
    backbone_path: Path,
    show_progress: bool,
) -> dict[str, Any]:
    """Pretrains on `images` (in this process, or on nproc_per_node torchrun ranks that read the same rows
    from `images_uri`), resuming from `run_dir`'s newest checkpoint, and exports the EMA teacher.

    Returns its `exports` row.
    """
    if cfg.train.nproc_per_node == 1:
        train(cfg, images, run_dir, show_progress=show_progress)
    else:
        launch_torchrun("training.launch", cfg, cfg.train.nproc_per_node, images_uri, run_dir)
    export_backbone(run_dir / CHECKPOINTS_DIR, backbone_path)
    return export_row(TEACHER_MODEL, backbone_path, checkpoint=run_dir / CHECKPOINTS_DIR)


def run_pretrain(cfg: PretrainConfig, inputs: Mapping[str, Manifest], ctx: StageContext) -> dict[str, Any]:
    images = inputs["curated"].read(CURATED)
    if images.num_rows == 0:
        return nothing_to_train(ctx, ctx.spec.name)
    run_dir = ctx.local_dir(RUN_DIR)
    backbone = ctx.local_dir(ARTIFACTS_DIR) / BACKBONE_FILE
    teacher = train_teacher(cfg, images, inputs["curated"].uri, run_dir, backbone, ctx.show_progress)
    stats = finish_training(ctx, run_dir, [teacher], f"pretrain {cfg.student.arch}")
    return {**stats, "images": images.num_rows, "backbone": str(backbone)}


def teacher_pca_figures(run: StageRun) -> list[FigureView]:
    """The DINOv2 picture of a committed pretraining: PCA of its teacher's patch features on a few of
    the images it trained on (none when it trained nothing)."""
    exports = read_exports(run.outputs["exports"])
    if not exports:
        return []
    export = next((row for row in exports if row["model"] == TEACHER_MODEL), exports[0])
    images = spread_images(run.inputs["curated"].uri, PCA_IMAGE_COUNT)
    png = pca_picture_png(load_exported_backbone(export), images)
    caption = (
        f"the DINOv2 picture: pretrained {export['model']} ({export['arch']}), the first three PCA "
        f"components of the patch features of {len(images)} training images as RGB, fitted on all their "
        "patches together; patches whose first component marks background are black"
    )
    return [FigureView(caption, png)]


PRETRAIN = register_stage(
    StageSpec(
        name="pretrain",
        # 4: the DINO/iBOT cross-entropy and Sinkhorn-Knopp sum in another order (same maths, other last bits)
        # 3: exports name files inside the store relative to the manifest (movable stores)
        version=4,
        config_type=PretrainConfig,
        fn=run_pretrain,
        inputs={"curated": CURATED},
        outputs={"metrics": TRAIN_METRICS, "exports": EXPORTS},
        description="DINOv2 pretraining (DINO + iBOT + KoLeo, EMA teacher) on the curated set",
        shown_stats=TRAINING_SHOWN_STATS,
        figures=teacher_pca_figures,
    )
)
