"""Where fan-out work runs: in this process, or as Ray tasks. The only module that imports ray for it.

Both executors take a picklable function and a list of items and yield `(item index, result)` as work
finishes. Stages never depend on the order results arrive in: shard outputs are keyed by content.

    map_unordered(fn, items)               fn(item): one task per item (Ray tasks)
    map_with_state(make_state, fn, items)  fn(state, item): `make_state()` runs once per worker, so a
                                           model loads once (Ray actors, each with its CPUs and GPUs)
    hold_states(make_states)               one worker per factory, each holding its own state (a shard
                                           of an index) for a `with` block; `broadcast(fn, item)` then
                                           runs fn(state, item) on every one of them (scatter-gather)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

RAY_ADDRESS_ENV = "RAY_ADDRESS"
# Why: keeping a few tasks queued per worker hides scheduling latency without pinning every shard's
# arguments in the object store at once.
TASKS_IN_FLIGHT_PER_WORKER = 2
# Held states are shards of one whole (an index): on a cluster each should get a node of its own.
HELD_STATE_SCHEDULING = "SPREAD"


class HeldStates(Protocol):
    def broadcast(self, fn: Callable[[Any, Any], Any], item: Any) -> list[Any]:
        """`fn(state, item)` for every held state, in the order of the factories that built them."""
        ...


class Executor(Protocol):
    num_workers: int

    def map_unordered(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]: ...

    def map_with_state(
        self, make_state: Callable[[], Any], fn: Callable[[Any, Any], Any], items: Sequence[Any]
    ) -> Iterator[tuple[int, Any]]: ...

    def hold_states(self, make_states: Sequence[Callable[[], Any]]) -> AbstractContextManager[HeldStates]: ...


@dataclass(frozen=True, slots=True)
class _LocalStates:
    states: list[Any]

    def broadcast(self, fn: Callable[[Any, Any], Any], item: Any) -> list[Any]:
        return [fn(state, item) for state in self.states]


@dataclass
class SerialExecutor:
    """Runs everything in the calling process, in order. The default for tests and tiny runs."""

    num_workers: int = 1

    def map_unordered(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        for index, item in enumerate(items):
            yield index, fn(item)

    def map_with_state(
        self, make_state: Callable[[], Any], fn: Callable[[Any, Any], Any], items: Sequence[Any]
    ) -> Iterator[tuple[int, Any]]:
        """`fn(state, item)` for every item, with one `make_state()` built first (none if no items)."""
        if not items:
            return
        state = make_state()
        for index, item in enumerate(items):
            yield index, fn(state, item)

    @contextmanager
    def hold_states(self, make_states: Sequence[Callable[[], Any]]) -> Iterator[HeldStates]:
        """Every state built here, up front; `broadcast` visits them one after another."""
        yield _LocalStates([make_state() for make_state in make_states])


@dataclass
class RayExecutor:
    """Runs each item as a Ray task with `cpus_per_task` CPUs, at most `num_workers` at a time.

    Stateful work (`map_with_state`) runs on `num_workers` actors instead, each reserving `cpus_per_task`
    CPUs and `gpus_per_worker` GPUs (Ray sets CUDA_VISIBLE_DEVICES for it, so 1.0 means one model per
    GPU). Joins the cluster at `address` (or `$RAY_ADDRESS`); with neither, starts a local Ray instance
    with `num_workers * cpus_per_task` CPUs and lets Ray detect the GPUs.
    """

    num_workers: int = 2
    cpus_per_task: float = 1.0
    address: str | None = None
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")

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

    def map_with_state(
        self, make_state: Callable[[], Any], fn: Callable[[Any, Any], Any], items: Sequence[Any]
    ) -> Iterator[tuple[int, Any]]:
        """`fn(state, item)` on `num_workers` actors (fewer for fewer items); each builds its state once."""
        if not items:
            return
        ray = self.start()
        from ray.util import ActorPool

        actor_class = ray.remote(num_cpus=self.cpus_per_task, num_gpus=self.gpus_per_worker, max_restarts=0)(
            _StatefulWorker
        )
        make_ref, fn_ref = ray.put(make_state), ray.put(fn)
        actors = [actor_class.remote(make_ref) for _ in range(min(self.num_workers, len(items)))]
        try:
            pool = ActorPool(actors)
            for index, item in enumerate(items):
                pool.submit(lambda actor, job: actor.run.remote(fn_ref, *job), (index, item))
            while pool.has_next():
                yield pool.get_next_unordered()
        finally:
            # Why: an actor holds its model (and GPU) until killed; a stage's workers end with it.
            for actor in actors:
                ray.kill(actor)

    @contextmanager
    def hold_states(self, make_states: Sequence[Callable[[], Any]]) -> Iterator[HeldStates]:
        """One actor per factory for the `with` block, each reserving `cpus_per_task` CPUs and
        `gpus_per_worker` GPUs, spread over the cluster's nodes; `broadcast` runs on all at once."""
        ray = self.start()
        actor_class = ray.remote(
            num_cpus=self.cpus_per_task,
            num_gpus=self.gpus_per_worker,
            max_restarts=0,
            scheduling_strategy=HELD_STATE_SCHEDULING,
        )(_StatefulWorker)
        actors = [actor_class.remote(make_state) for make_state in make_states]
        try:
            yield _ActorStates(ray, actors)
        finally:
            for actor in actors:
                ray.kill(actor)


@dataclass(frozen=True, slots=True)
class _ActorStates:
    ray: Any  # the initialised ray module
    actors: list[Any]

    def broadcast(self, fn: Callable[[Any, Any], Any], item: Any) -> list[Any]:
        fn_ref, item_ref = self.ray.put(fn), self.ray.put(item)  # stored once, read by every actor
        calls = [actor.run.remote(fn_ref, position, item_ref) for position, actor in enumerate(self.actors)]
        return [result for _, result in self.ray.get(calls)]


def _apply(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


class _StatefulWorker:
    """A Ray actor body: builds its state (e.g. a loaded model) once, then applies `fn` to many items."""

    def __init__(self, make_state: Callable[[], Any]):
        self.state = make_state()

    def run(self, fn: Callable[[Any, Any], Any], index: int, item: Any) -> tuple[int, Any]:
        return index, fn(self.state, item)


def build_executor(
    kind: str, num_workers: int, ray_address: str | None = None, gpus_per_worker: float = 0.0
) -> Executor:
    if kind == "serial":
        return SerialExecutor()
    if kind == "ray":
        return RayExecutor(num_workers=num_workers, address=ray_address, gpus_per_worker=gpus_per_worker)
    raise ValueError(f"executor must be 'serial' or 'ray', got {kind!r}")
