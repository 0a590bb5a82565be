"""The `pretrain` stage: DINOv2 pretraining on the curated manifest, as one step of curate-and-train.

    curated manifest --train (this process, or torchrun with nproc_per_node processes)-->
      <stage dir>/run/checkpoints (DCP, resumable) + run/metrics chunks
      --> `metrics` manifest (one row per step), artifacts/backbone.pth (+ .json build options),
          `exports` manifest (one row: the teacher backbone), artifacts/loss_curve.png

A killed stage resumes from its newest checkpoint the next time it runs (same key, same folder).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from pipelines.manifest import CURATED, EXPORTS, TRAIN_METRICS
from pipelines.stage import ARTIFACTS_DIR, Manifest, StageContext, StageSpec, config_to_dict, register_stage
from pipelines.train_config import PretrainConfig
from training.checkpoint import export_backbone
from training.exports import export_row
from training.plots import loss_curve_png
from training.trainer import CHECKPOINTS_DIR, read_metrics, train

RUN_DIR = "run"
BACKBONE_FILE = "backbone.pth"
LOSS_CURVE_FILE = "loss_curve.png"
CONFIG_FILE = "launch_config.json"
TEACHER_MODEL = "teacher"  # pretraining exports its EMA teacher, the model DINOv2 releases


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


def run_pretrain(cfg: PretrainConfig, inputs: Mapping[str, Manifest], ctx: StageContext) -> dict[str, Any]:
    images = inputs["curated"].read(CURATED)
    if images.num_rows == 0:
        raise ValueError("pretrain: the curated manifest is empty; nothing to train on")
    run_dir = ctx.local_dir(RUN_DIR)
    if cfg.train.nproc_per_node == 1:
        train(cfg, images, run_dir, show_progress=ctx.show_progress)
    else:
        launch_torchrun("training.launch", cfg, cfg.train.nproc_per_node, inputs["curated"].uri, run_dir)
    metrics = TRAIN_METRICS.validate(read_metrics(run_dir))
    ctx.write_output("metrics", metrics)
    artifacts = ctx.local_dir(ARTIFACTS_DIR)
    export_backbone(run_dir / CHECKPOINTS_DIR, artifacts / BACKBONE_FILE)
    teacher = export_row(TEACHER_MODEL, artifacts / BACKBONE_FILE, checkpoint=run_dir / CHECKPOINTS_DIR)
    ctx.write_output("exports", EXPORTS.table_from_rows([teacher]))
    ctx.write_artifact(LOSS_CURVE_FILE, loss_curve_png(metrics, f"pretrain {cfg.student.arch}"))
    objective = metrics.column("objective")
    return {
        "steps": metrics.num_rows,
        "images": images.num_rows,
        "objective_first": objective[0].as_py(),
        "objective_last": objective[-1].as_py(),
        "seconds_per_step": round(pc.mean(metrics.column("seconds")).as_py(), 4),
        "backbone": str(artifacts / BACKBONE_FILE),
    }


PRETRAIN = register_stage(
    StageSpec(
        name="pretrain",
        version=2,
        config_type=PretrainConfig,
        fn=run_pretrain,
        inputs=("curated",),
        outputs={"metrics": TRAIN_METRICS, "exports": EXPORTS},
        description="DINOv2 pretraining (DINO + iBOT + KoLeo, EMA teacher) on the curated set",
    )
)
