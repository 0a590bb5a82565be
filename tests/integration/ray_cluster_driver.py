"""The driver of the two-node Ray cluster test (see test_ray_cluster.py): runs ingest .. assemble for a
config in a fresh process, serially, or on the cluster at $RAY_ADDRESS.

    config JSON --build_config--> the config's own executor; a Ray one is wrapped to note the Ray node of
      every task, every stateful worker's item and every held index shard's search
    --> run_pipeline(until="assemble") --> JSON: each stage's output digests (Ray: the alive nodes and
        the nodes each kind of work ran on)

Both runs of the test are processes of their own with the same environment (thread counts included:
float results of a model depend on them), and joining the cluster (with its auth token) leaves the test
process's Ray connection, if any, alone.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from flows.curate_and_train import CURATE_AND_TRAIN, CurateAndTrainConfig
from flows.dag import executor_for, run_pipeline
from pipelines.executor import HeldStates, RayExecutor

LAST_STAGE = "assemble"
EXPECTED_NODES = 2
NODES_WAIT_S = 60
# The resource only `ray start --address` gave its node, and the one Ray gives the head.
WORKER_NODE_RESOURCE = "worker_node"
HEAD_NODE_RESOURCE = "node:__internal_head__"


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def _task_on_node(fn: Callable[[Any], Any], item: Any) -> tuple[str, Any]:
    return _node_id(), fn(item)


def _state_on_node(fn: Callable[[Any, Any], Any], state: Any, item: Any) -> tuple[str, Any]:
    return _node_id(), fn(state, item)


@dataclass(frozen=True, slots=True)
class _RecordingStates:
    inner: HeldStates
    nodes: set[str]

    def broadcast(self, fn: Callable[[Any, Any], Any], item: Any) -> list[Any]:
        found = self.inner.broadcast(functools.partial(_state_on_node, fn), item)
        self.nodes.update(node for node, _ in found)
        return [result for _, result in found]


@dataclass
class NodeRecordingExecutor:
    """Runs everything on `inner` unchanged and notes, per kind of work, the Ray nodes it ran on."""

    inner: RayExecutor
    used: dict[str, set[str]] = field(
        default_factory=lambda: {"tasks": set(), "stateful": set(), "held": set()}
    )

    @property
    def num_workers(self) -> int:
        return self.inner.num_workers

    def map_unordered(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        for index, (node, result) in self.inner.map_unordered(functools.partial(_task_on_node, fn), items):
            self.used["tasks"].add(node)
            yield index, result

    def map_with_state(
        self, make_state: Callable[[], Any], fn: Callable[[Any, Any], Any], items: Sequence[Any]
    ) -> Iterator[tuple[int, Any]]:
        noted = functools.partial(_state_on_node, fn)
        for index, (node, result) in self.inner.map_with_state(make_state, noted, items):
            self.used["stateful"].add(node)
            yield index, result

    @contextmanager
    def hold_states(self, make_states: Sequence[Callable[[], Any]]) -> Iterator[HeldStates]:
        with self.inner.hold_states(make_states) as held:
            yield _RecordingStates(held, self.used["held"])


def _alive_nodes() -> list[dict[str, Any]]:
    return [node for node in ray.nodes() if node["Alive"]]


def _wait_for_nodes() -> None:
    deadline = time.monotonic() + NODES_WAIT_S
    while len(_alive_nodes()) < EXPECTED_NODES:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the cluster has {len(_alive_nodes())} alive nodes, expected {EXPECTED_NODES}"
            )
        time.sleep(0.5)


def _node_with(resource: str, nodes: list[dict[str, Any]]) -> str:
    (node,) = [node["NodeID"] for node in nodes if resource in node["Resources"]]
    return node


def _digests(runs: dict) -> dict[str, dict[str, str]]:
    return {stage: {name: m.digest for name, m in run.outputs.items()} for stage, run in runs.items()}


def _run_on_cluster(cfg: CurateAndTrainConfig, executor: RayExecutor) -> dict[str, Any]:
    assert executor.address is None, "the cluster must come from RAY_ADDRESS"
    executor.start()
    _wait_for_nodes()
    recording = NodeRecordingExecutor(executor)
    runs = run_pipeline(CURATE_AND_TRAIN, cfg, executor=recording, until=LAST_STAGE)
    alive = _alive_nodes()  # still both, after all the work
    result = {
        "digests": _digests(runs),
        "alive": sorted(node["NodeID"] for node in alive),
        "head": _node_with(HEAD_NODE_RESOURCE, alive),
        "worker": _node_with(WORKER_NODE_RESOURCE, alive),
        "used": {kind: sorted(nodes) for kind, nodes in recording.used.items()},
    }
    ray.shutdown()
    return result


def main(config_path: str, out_path: str) -> None:
    cfg = CURATE_AND_TRAIN.build_config(json.loads(Path(config_path).read_text()))
    executor = executor_for(cfg)
    if isinstance(executor, RayExecutor):
        result = _run_on_cluster(cfg, executor)
    else:
        runs = run_pipeline(CURATE_AND_TRAIN, cfg, executor=executor, until=LAST_STAGE)
        result = {"digests": _digests(runs)}
    Path(out_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
