"""One whole curate-and-train run on the small demo, shared by the test modules that rerun parts of it.

Building the demo and curating it is most of a whole-DAG test's time, so the run is made once per
session (cached per pytest base folder); each test reruns on top of it in the same store: changed
configs get new keys, so nothing committed is overwritten.
"""

from __future__ import annotations

import functools
from pathlib import Path

from curation.demo import build_demo_data
from flows.curate_and_train import CURATE_AND_TRAIN, CurateAndTrainConfig
from flows.dag import run_pipeline
from pipelines.stage import StageRun
from tests.helpers import SMALL_DEMO, demo_job_config

DEMO_DAG_DIR = "small-demo-dag"
SMALL_DEMO_FILES_PER_SHARD = 16


@functools.cache
def small_demo_dag(base: Path) -> tuple[CurateAndTrainConfig, dict[str, StageRun]]:
    """The small demo's job config (tiny training sections) and the runs of its whole DAG, under `base`."""
    root = base / DEMO_DAG_DIR
    data = build_demo_data(root / "demo-data", SMALL_DEMO)
    cfg = demo_job_config(data, root / "store", files_per_shard=SMALL_DEMO_FILES_PER_SHARD)
    return cfg, run_pipeline(CURATE_AND_TRAIN, cfg)
