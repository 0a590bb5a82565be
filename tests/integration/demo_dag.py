"""One whole curate-and-train run on the small demo, shared by the test modules that rerun parts of it.

Building the demo and curating it is most of a whole-DAG test's time, so the run is made once per
session (cached per pytest base folder); each test reruns on top of it in the same store: changed
configs get new keys, so nothing committed is overwritten.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

from curation.demo import build_demo_data
from flows.curate_and_train import CURATE_AND_TRAIN, CurateAndTrainConfig
from flows.dag import run_pipeline
from pipelines.stage import StageRun
from tests.helpers import SMALL_DEMO, demo_job_config

DEMO_DAG_DIR = "small-demo-dag"
SMALL_DEMO_FILES_PER_SHARD = 16
# Rows per shard of the stages that fan out over rows: a few shards each on the small demo, so that
# shard-level resume has finished shards to keep (the demo's own sizes give one shard each here).
SMALL_DEMO_ROWS_PER_SHARD = 32
SMALL_DEMO_QUERIES_PER_SHARD = 4


def small_demo_config(data: Path, store: Path) -> CurateAndTrainConfig:
    """The demo preset on small demo data, tiny training sections, a few shards per fan-out stage."""
    cfg = demo_job_config(data, store, files_per_shard=SMALL_DEMO_FILES_PER_SHARD)
    rows = SMALL_DEMO_ROWS_PER_SHARD
    return replace(
        cfg,
        # Partitions too: the dedup stages' keep rule and outputs run (and resume) a partition at a time.
        exact_dedup=replace(cfg.exact_dedup, rows_per_part=rows),
        phash_dedup=replace(cfg.phash_dedup, rows_per_shard=rows, rows_per_partition=rows),
        copy_dedup=replace(cfg.copy_dedup, rows_per_shard=rows, rows_per_partition=rows),
        decontaminate=replace(cfg.decontaminate, rows_per_partition=rows),
        embed=replace(cfg.embed, rows_per_shard=rows),
        cluster=replace(cfg.cluster, rows_per_shard=rows),
        balance=replace(cfg.balance, rows_per_shard=rows),
        retrieve=replace(cfg.retrieve, rows_per_shard=SMALL_DEMO_QUERIES_PER_SHARD),
    )


@functools.cache
def small_demo_dag(base: Path) -> tuple[CurateAndTrainConfig, dict[str, StageRun]]:
    """The small demo's job config and the runs of its whole DAG, under `base`."""
    root = base / DEMO_DAG_DIR
    data = build_demo_data(root / "demo-data", SMALL_DEMO)
    cfg = small_demo_config(data, root / "store")
    return cfg, run_pipeline(CURATE_AND_TRAIN, cfg)
