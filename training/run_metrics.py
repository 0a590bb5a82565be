"""The training metrics: one row per step (schema TRAIN_METRICS), written in chunks under a run folder.

<run>/metrics/steps_<first>_<last>.parquet, one chunk per checkpoint period, written atomically
read_metrics: every chunk, by step; drop_metrics_after: a resumed run's chunks past its checkpoint
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.manifest import ManifestSchema
from training.health import HEALTH_COLUMNS

METRICS_DIR = "metrics"
METRICS_CHUNK = "steps_{first:08d}_{last:08d}.parquet"


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
