"""A real two-node Ray cluster on loopback runs the curation stages and writes what a serial run writes.

ray start --head (1 CPU)  +  ray start --address=<head> (1 CPU, resource worker_node)
  each node with its own temp dir, ports and process group; token auth with a fresh token
driver process, serial: ingest .. assemble on the small demo, one index per k-NN search, the dedup stages
  partitioned (PARTITION_ROWS rows a partition: their keep rule and outputs a partition at a time)
driver process, RAY_ADDRESS=<head>: the same with runtime.executor=ray and 2 index shards
  (ray_cluster_driver.py notes the node every task, stateful worker and index shard ran on)
--> every output digest equal; the work ran on both nodes; both nodes stopped, no process left
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from curation.demo import build_demo_data
from flows.curate_and_train import CURATE_AND_TRAIN, CurateAndTrainConfig
from pipelines.config import config_as_dict
from tests.helpers import SMALL_DEMO, demo_job_config
from tests.integration.ray_cluster_driver import LAST_STAGE, WORKER_NODE_RESOURCE

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RAY_CLI = str(Path(sys.executable).with_name("ray"))
LOOPBACK = "127.0.0.1"
NUM_NODES = 2
CPUS_PER_NODE = 1
SEARCH_SHARDS = 2
SMALL_DEMO_FILES_PER_SHARD = 16
MODEL_ROWS_PER_SHARD = 32  # about 110 images: 4 shards for copy_dedup's descriptors and for embed
# Rows per partition of the dedup stages (and per part of exact_dedup's images): several partitions on
# the small demo, so their keep rule and outputs spread over both nodes.
PARTITION_ROWS = 48
PARTITIONED_STAGES = ("phash_dedup", "copy_dedup", "decontaminate")
HEAD_START_TIMEOUT_S = 60
DRIVER_TIMEOUT_S = 240
NODE_STOP_TIMEOUT_S = 20
# Every port a node listens on that has a fixed default (two nodes on one host would collide).
NODE_PORT_FLAGS = (
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
)


def _process_env() -> dict[str, str]:
    """The environment of every process the test starts: drivers, nodes and so Ray's workers."""
    env = {
        **os.environ,
        # Why: a model's float results depend on its thread count, and Ray gives a 1-CPU worker one
        # thread; the serial driver must compute with as many.
        "OMP_NUM_THREADS": str(CPUS_PER_NODE),
        "PYTHONPATH": str(REPO),  # Ray's workers import the driver's node-noting wrappers from tests/
    }
    env.pop("RAY_ADDRESS", None)
    return env


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the head node exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        with socket.socket() as probe:
            if probe.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"the head node did not listen on {port} within {HEAD_START_TIMEOUT_S} s")


@dataclass(frozen=True, slots=True)
class Cluster:
    address: str
    env: dict[str, str]  # what a process needs to join it (auth token, imports)
    nodes: tuple[subprocess.Popen, ...]
    root: Path  # the nodes' temp dirs and logs


def _start_node(name: str, root: Path, env: dict[str, str], *flags: str) -> subprocess.Popen:
    """`ray start --block` in a new session: the node's processes share one process group to stop."""
    command = [
        RAY_CLI,
        "start",
        f"--num-cpus={CPUS_PER_NODE}",
        f"--node-ip-address={LOOPBACK}",
        f"--temp-dir={root / name}",  # Why: not /tmp/ray, which every other Ray on this host shares
        "--disable-usage-stats",
        "--block",
        *(f"{flag}={_free_port()}" for flag in NODE_PORT_FLAGS),
        *flags,
    ]
    with (root / f"{name}.log").open("w") as log:  # the node writes to its own copy of the handle
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _stop_node(node: subprocess.Popen) -> None:
    """SIGTERM makes `ray start --block` stop its own processes; SIGKILL to its group catches stragglers."""
    node.terminate()
    with suppress(subprocess.TimeoutExpired):
        node.wait(timeout=NODE_STOP_TIMEOUT_S)
    with suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGKILL)  # the group id is the `ray start` pid (new session)
    node.wait(timeout=NODE_STOP_TIMEOUT_S)


def _group_gone(pgid: int) -> bool:
    """Whether no process of group `pgid` is left, waiting a little for killed ones to be reaped."""
    deadline = time.monotonic() + NODE_STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@contextmanager
def two_node_cluster() -> Iterator[Cluster]:
    """A head and a worker node on loopback for the `with` block, both stopped at its end in any case."""
    # Why a short folder under /tmp: Ray's socket paths live inside it and must stay under ~107 bytes.
    root = Path(tempfile.mkdtemp(prefix="lvd-ray-", dir="/tmp"))
    env = {
        **_process_env(),
        # Why: `ray start` turns token auth on whenever ~/.ray/auth_token exists; one fresh token for
        # the nodes and the driver makes the test independent of that file and keeps other users out.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": uuid.uuid4().hex,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    port = _free_port()
    head = _start_node(
        "head",
        root,
        env,
        "--head",
        f"--port={port}",
        "--include-dashboard=false",
        f"--dashboard-port={_free_port()}",
    )
    nodes = [head]
    try:
        _wait_for_port(port, head, root / "head.log")
        address = f"{LOOPBACK}:{port}"
        worker_resources = json.dumps({WORKER_NODE_RESOURCE: 1})
        nodes.append(
            _start_node("worker", root, env, f"--address={address}", f"--resources={worker_resources}")
        )
        yield Cluster(address, env, tuple(nodes), root)
    finally:
        for node in reversed(nodes):
            _stop_node(node)
        shutil.rmtree(root, ignore_errors=True)


def _run_driver(cfg: CurateAndTrainConfig, out: Path, env: dict[str, str], logs: Path | None = None) -> dict:
    """Runs ray_cluster_driver.py on `cfg` in a fresh process; on failure, shows its output and `logs`."""
    config_path = out.with_suffix(".config.json")
    config_path.write_text(json.dumps(config_as_dict(cfg)))
    driver = subprocess.run(
        [sys.executable, "-m", "tests.integration.ray_cluster_driver", str(config_path), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=DRIVER_TIMEOUT_S,
    )
    node_logs = "".join(log.read_text()[-2000:] for log in sorted(logs.glob("*.log"))) if logs else ""
    assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-3000:] + node_logs
    return json.loads(out.read_text())


def _sharded(section: Any) -> Any:
    """A searching stage's section with its k-NN index split over SEARCH_SHARDS executor workers."""
    return replace(section, search=replace(section.search, shards=SEARCH_SHARDS))


@pytest.mark.timeout(2 * DRIVER_TIMEOUT_S + 3 * HEAD_START_TIMEOUT_S)
def test_curation_on_a_two_node_cluster_equals_the_serial_run(tmp_path):
    data = build_demo_data(tmp_path / "demo-data", SMALL_DEMO)
    demo = demo_job_config(data, tmp_path / "serial-store", files_per_shard=SMALL_DEMO_FILES_PER_SHARD)
    # Several shards for the model stages, so that both of their actors (one per node) get work.
    serial_cfg = replace(
        demo,
        exact_dedup=replace(demo.exact_dedup, rows_per_part=PARTITION_ROWS),
        phash_dedup=replace(demo.phash_dedup, rows_per_partition=PARTITION_ROWS),
        copy_dedup=replace(
            demo.copy_dedup, rows_per_shard=MODEL_ROWS_PER_SHARD, rows_per_partition=PARTITION_ROWS
        ),
        decontaminate=replace(demo.decontaminate, rows_per_partition=PARTITION_ROWS),
        embed=replace(demo.embed, rows_per_shard=MODEL_ROWS_PER_SHARD),
    )
    cluster_cfg = replace(
        serial_cfg,
        store=str(tmp_path / "cluster-store"),
        runtime=replace(
            serial_cfg.runtime, executor="ray", num_workers=NUM_NODES * CPUS_PER_NODE, ray_address=None
        ),
        copy_dedup=_sharded(serial_cfg.copy_dedup),
        decontaminate=_sharded(serial_cfg.decontaminate),
        retrieve=_sharded(serial_cfg.retrieve),
    )
    serial = _run_driver(serial_cfg, tmp_path / "serial.json", _process_env())
    with two_node_cluster() as cluster:
        env = {**cluster.env, "RAY_ADDRESS": cluster.address}
        found = _run_driver(cluster_cfg, tmp_path / "cluster.json", env, cluster.root)
    assert all(_group_gone(node.pid) for node in cluster.nodes), "a Ray process outlived its node"

    assert list(found["digests"]) == [node.stage for node in CURATE_AND_TRAIN.nodes_until(LAST_STAGE)]
    assert found["digests"] == serial["digests"]
    for stage in PARTITIONED_STAGES:  # partitioned runs: several output parts, one per partition
        assert len(list((tmp_path / "cluster-store" / stage).glob("*/images/*.parquet"))) > 1, stage
    both = {found["head"], found["worker"]}
    assert len(both) == 2 and set(found["alive"]) == both
    # One CPU per node: the two model-holding actors, and the two index shards, must be one per node.
    assert set(found["used"]["stateful"]) == both
    assert set(found["used"]["held"]) == both
    assert found["used"]["tasks"] and set(found["used"]["tasks"]) <= both
