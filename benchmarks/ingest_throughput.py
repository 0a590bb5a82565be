"""Ingest throughput on the demo pool: SerialExecutor vs RayExecutor with 2 workers, side by side.

    python -m benchmarks.ingest_throughput [--repeats N]

Each run ingests into a fresh temporary store, so nothing is reused. Ray starts before the clock
does: its start-up is a one-off per job, not a per-image cost.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

import curation  # noqa: F401  (registers ingest)
from pipelines.config import IngestConfig, resolve_config
from pipelines.executor import Executor, RayExecutor, SerialExecutor
from pipelines.stage import get_stage, run_stage
from pipelines.store import Store

RAY_WORKERS = 2


def _pool_config() -> IngestConfig:
    demo = resolve_config("demo").ingest
    return replace(demo, sources=tuple(source for source in demo.sources if source.role == "uncurated"))


def _time_ingest(cfg: IngestConfig, executor: Executor) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as store_root:
        started = time.perf_counter()
        store = Store(store_root)
        run = run_stage(get_stage("ingest"), cfg, {}, store=store, executor=executor, show_progress=False)
        seconds = time.perf_counter() - started
    return seconds, run.outputs["images"].num_rows + run.outputs["rejected"].num_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2, help="best of N runs per executor")
    args = parser.parse_args()
    cfg = _pool_config()
    ray_executor = RayExecutor(num_workers=RAY_WORKERS)
    ray_executor.start()
    results = {}
    for name, executor in (("serial", SerialExecutor()), (f"ray x{RAY_WORKERS}", ray_executor)):
        timings = [_time_ingest(cfg, executor) for _ in range(args.repeats)]
        seconds, rows = min(timings)
        results[name] = rows / seconds
        print(f"{name:>8}: {rows} inputs in {seconds:.2f} s = {rows / seconds:,.0f} images/s")
    speedup = results[f"ray x{RAY_WORKERS}"] / results["serial"]
    efficiency = speedup / RAY_WORKERS
    print(f"speed-up {speedup:.2f}x, parallel efficiency {efficiency:.0%} on {RAY_WORKERS} workers")


if __name__ == "__main__":
    main()
