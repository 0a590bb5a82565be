"""Where fan-out work runs: in this process, or as Ray tasks. The only module that imports ray for it.

Both executors take a picklable function and a list of items and yield `(item index, result)` as work
finishes. Stages never depend on the order results arrive in: shard outputs are keyed by content.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

RAY_ADDRESS_ENV = "RAY_ADDRESS"
# Why: keeping a few tasks queued per worker hides scheduling latency without pinning every shard's
# arguments in the object store at once.
TASKS_IN_FLIGHT_PER_WORKER = 2


class Executor(Protocol):
    num_workers: int

    def map_unordered(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]: ...


@dataclass
class SerialExecutor:
    """Runs everything in the calling process, in order. The default for tests and tiny runs."""

    num_workers: int = 1

    def map_unordered(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        for index, item in enumerate(items):
            yield index, fn(item)


@dataclass
class RayExecutor:
    """Runs each item as a Ray task with `cpus_per_task` CPUs, at most `num_workers` at a time.

    Joins the cluster at `address` (or `$RAY_ADDRESS`); with neither, starts a local Ray instance
    with `num_workers * cpus_per_task` CPUs.
    """

    num_workers: int = 2
    cpus_per_task: float = 1.0
    address: str | None = None

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")

    def start(self):
        """Connects to (or starts) Ray once; later calls return the initialised module."""
        import ray  # heavy import: only when Ray work actually runs

        if not ray.is_initialized():
            address = self.address or os.environ.get(RAY_ADDRESS_ENV)
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                num_cpus = max(1, int(self.num_workers * self.cpus_per_task))
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        return ray

    def map_unordered(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        if not items:
            return
        ray = self.start()
        remote_apply = ray.remote(num_cpus=self.cpus_per_task, max_retries=0)(_apply)
        fn_ref = ray.put(fn)  # shipped once; every task receives the same object
        max_in_flight = self.num_workers * TASKS_IN_FLIGHT_PER_WORKER
        pending: dict[Any, int] = {}
        next_index = 0
        while next_index < len(items) or pending:
            while next_index < len(items) and len(pending) < max_in_flight:
                pending[remote_apply.remote(fn_ref, items[next_index])] = next_index
                next_index += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                yield pending.pop(ref), ray.get(ref)


def _apply(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


def build_executor(kind: str, num_workers: int, ray_address: str | None = None) -> Executor:
    if kind == "serial":
        return SerialExecutor()
    if kind == "ray":
        return RayExecutor(num_workers=num_workers, address=ray_address)
    raise ValueError(f"executor must be 'serial' or 'ray', got {kind!r}")
