"""Through a real Prefect server: serve the deployments, run curate-and-train/default, check manifests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipelines.manifest import IMAGES, read_manifest
from tests.helpers import TINY_DAG_STEPS, TINY_DESCRIPTOR, three_source_config
from tests.training_helpers import tiny_training_sections

SERVER_START_TIMEOUT_S = 120
DEPLOYMENT_WAIT_S = 120
FLOW_RUN_TIMEOUT_S = 300

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def prefect_server(tmp_path):
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": api_url,
    }
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent))
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115  (closed below, after the server stops)
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_until(lambda: _healthy(api_url), SERVER_START_TIMEOUT_S, "the Prefect server")
        yield env
    finally:
        _stop(server)
        log.close()


def test_deployment_run_through_a_real_server(tmp_path, prefect_server):
    env = prefect_server
    ingest = three_source_config(tmp_path / "data")
    store = tmp_path / "store"
    config_file = tmp_path / "job.yaml"
    sources = [{"name": s.name, "role": s.role, "kind": s.kind, "path": s.path} for s in ingest.sources]
    config_file.write_text(
        yaml.safe_dump(
            {
                "store": str(store),
                "runtime": {"executor": "serial", "show_progress": False},
                "ingest": {"sources": sources, "files_per_shard": 5},
                **tiny_training_sections(TINY_DAG_STEPS),
                "copy_descriptor": TINY_DESCRIPTOR,
            }
        )
    )
    bin_dir = Path(sys.executable).parent
    serve_log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    serve = subprocess.Popen(
        [str(bin_dir / "lvd"), "serve", "--config", str(config_file)],
        env=env,
        stdout=serve_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    prefect = str(bin_dir / "prefect")
    try:

        def deployment_exists() -> bool:
            listing = subprocess.run([prefect, "deployment", "ls"], env=env, capture_output=True, text=True)
            return "curate-and-train/default" in listing.stdout.replace("\n", "")

        _wait_until(deployment_exists, DEPLOYMENT_WAIT_S, "the served deployments")
        result = subprocess.run(
            [prefect, "deployment", "run", "curate-and-train/default", "--watch"],
            env=env,
            capture_output=True,
            text=True,
            timeout=FLOW_RUN_TIMEOUT_S,
        )
    finally:
        _stop(serve)
        serve_log.close()
    assert result.returncode == 0, result.stdout + result.stderr + (tmp_path / "serve.log").read_text()
    assert "Completed" in result.stdout

    records = list(store.glob("ingest/*/_STAGE.json"))
    assert len(records) == 1
    images = read_manifest(records[0].parent / "images", IMAGES)
    assert images.num_rows == 36
    assert sorted(set(images.column("source").to_pylist())) == ["pool", "seeds", "web"]
    # The training stages ran too: one metrics row per step, and results for the three models.
    (pretrain_record,) = store.glob("pretrain/*/_STAGE.json")
    metrics = read_manifest(pretrain_record.parent / "metrics")
    assert metrics.column("step").to_pylist() == list(range(TINY_DAG_STEPS))
    (evaluate_record,) = store.glob("evaluate/*/_STAGE.json")
    results = read_manifest(evaluate_record.parent / "results")
    assert set(results.column("model").to_pylist()) == {
        "teacher",
        "student",
        "student_random_init",
        "raw_pixels",
    }
