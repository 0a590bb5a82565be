"""Stateful fan-out: `map_with_state` builds each worker's state once (Ray: one actor each)."""

from __future__ import annotations

import functools
import os
import uuid
from pathlib import Path

import pytest

from pipelines.executor import RayExecutor, SerialExecutor, build_executor

NUM_ITEMS = 7


def _make_state(marker_dir: str) -> str:
    """A state that leaves one file per construction, so the test can count them across processes."""
    token = f"{os.getpid()}-{uuid.uuid4().hex}"
    Path(marker_dir, token).touch()
    return token


def _work(state: str, item: int) -> tuple[str, int]:
    return state, item * item


def _run(executor, marker_dir: Path) -> dict[int, tuple[str, int]]:
    make_state = functools.partial(_make_state, str(marker_dir))
    return dict(executor.map_with_state(make_state, _work, list(range(NUM_ITEMS))))


def test_serial_builds_the_state_once(tmp_path):
    results = _run(SerialExecutor(), tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    assert {state for state, _ in results.values()} == {path.name for path in tmp_path.iterdir()}
    assert list(SerialExecutor().map_with_state(lambda: pytest.fail("built"), _work, [])) == []


def test_ray_builds_one_state_per_actor_and_matches_serial(tmp_path, ray_session):
    serial_dir, ray_dir = tmp_path / "serial", tmp_path / "ray"
    serial_dir.mkdir()
    ray_dir.mkdir()
    serial = _run(SerialExecutor(), serial_dir)
    parallel = _run(RayExecutor(num_workers=2), ray_dir)
    assert {index: value for index, (_, value) in parallel.items()} == {
        index: value for index, (_, value) in serial.items()
    }
    built = {path.name for path in ray_dir.iterdir()}
    assert len(built) == 2  # two actors, each built once, for seven items
    assert {state for state, _ in parallel.values()} <= built
    assert len({token.split("-")[0] for token in built}) == 2  # in two processes


def test_gpus_per_worker_reaches_the_ray_executor():
    executor = build_executor("ray", num_workers=3, gpus_per_worker=0.5)
    assert isinstance(executor, RayExecutor) and executor.gpus_per_worker == 0.5
    with pytest.raises(ValueError, match="gpus_per_worker"):
        RayExecutor(gpus_per_worker=-1)
