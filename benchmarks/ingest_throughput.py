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
from typing import Any

import curation  # noqa: F401  (registers ingest)
from curation.ingest import IngestConfig
from flows.curate_and_train import CURATE_AND_TRAIN
from pipelines.executor import Executor, RayExecutor, SerialExecutor
from pipelines.stage import get_stage, run_stage
from pipelines.store import Store

RAY_WORKERS = 2
DEFAULT_REPEATS = 2


def _pool_config() -> IngestConfig:
    demo = CURATE_AND_TRAIN.resolve_config("demo").ingest
    return replace(demo, sources=tuple(source for source in demo.sources if source.role == "uncurated"))


def _time_ingest(cfg: IngestConfig, executor: Executor) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as store_root:
        started = time.perf_counter()
        store = Store(store_root)
        run = run_stage(get_stage("ingest"), cfg, {}, store=store, executor=executor, show_progress=False)
        seconds = time.perf_counter() - started
    return seconds, run.outputs["images"].num_rows + run.outputs["rejected"].num_rows


def measure(repeats: int = DEFAULT_REPEATS) -> dict[str, Any]:
    """Images/s of the serial and the Ray executor (best of `repeats` each), the speed-up and efficiency."""
    cfg = _pool_config()
    ray_executor = RayExecutor(num_workers=RAY_WORKERS)
    ray = ray_executor.start()
    try:
        best = {}
        for name, executor in (("serial", SerialExecutor()), ("ray", ray_executor)):
            best[name] = min(_time_ingest(cfg, executor) for _ in range(repeats))
    finally:
        ray.shutdown()  # why: a runner goes on to other benchmarks; idle Ray workers would hold memory
    rows = best["serial"][1]
    serial, parallel = rows / best["serial"][0], rows / best["ray"][0]
    return {
        "inputs": rows,
        "workers": RAY_WORKERS,
        "serial_seconds": best["serial"][0],
        "ray_seconds": best["ray"][0],
        "serial_images_per_s": serial,
        "ray_images_per_s": parallel,
        "speedup": parallel / serial,
        "efficiency": parallel / serial / RAY_WORKERS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="best of N runs per executor")
    args = parser.parse_args()
    result = measure(args.repeats)
    for name, label in (("serial", "serial"), ("ray", f"ray x{RAY_WORKERS}")):
        seconds, speed = result[f"{name}_seconds"], result[f"{name}_images_per_s"]
        print(f"{label:>8}: {result['inputs']} inputs in {seconds:.2f} s = {speed:,.0f} images/s")
    print(
        f"speed-up {result['speedup']:.2f}x, parallel efficiency {result['efficiency']:.0%} "
        f"on {RAY_WORKERS} workers"
    )


if __name__ == "__main__":
    main()
