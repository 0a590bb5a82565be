"""`lvd run`'s private Prefect server lives exactly as long as the run, however the run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from flows.cli import SIGTERM_EXIT
from tests.helpers import three_source_config

SERVER_APP = "prefect.server.api.server:create_app"
START_TIMEOUT_S = 90
GONE_TIMEOUT_S = 20
POLL_S = 0.1


def _children(parent: int) -> list[int]:
    """Pids whose parent is `parent` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            if int(fields[1]) == parent:
                found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _healthy_server_of(run: subprocess.Popen) -> int:
    """The pid of the run's server child, once it answers."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert run.poll() is None, "the run ended before its server was up"
        for pid in _children(run.pid):
            command = _cmdline(pid)
            if SERVER_APP in command:
                port = command[command.index("--port") + 1]
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/api/health").status_code == httpx.codes.OK:
                        return pid
                except httpx.HTTPError:
                    pass
        time.sleep(POLL_S)
    raise TimeoutError("no healthy Prefect server child appeared")


@pytest.mark.timeout(START_TIMEOUT_S + 2 * GONE_TIMEOUT_S)
@pytest.mark.parametrize(
    ("signum", "status"), [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGTERM, SIGTERM_EXIT)]
)
def test_a_killed_run_takes_its_prefect_server_with_it(tmp_path, signum, status):
    ingest = three_source_config(tmp_path / "data")
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "store": str(tmp_path / "store"),
                "runtime": {"executor": "serial", "show_progress": False},
                "ingest": {
                    "sources": [
                        {"name": s.name, "role": s.role, "kind": s.kind, "path": s.path}
                        for s in ingest.sources
                    ]
                },
            }
        )
    )
    env = {name: value for name, value in os.environ.items() if name != "PREFECT_API_URL"}
    lvd = Path(sys.executable).parent / "lvd"
    run = subprocess.Popen(
        [str(lvd), "run", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = None
    try:
        server = _healthy_server_of(run)
        run.send_signal(signum)
        assert run.wait(timeout=GONE_TIMEOUT_S) == status
        deadline = time.monotonic() + GONE_TIMEOUT_S
        while _alive(server) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        assert not _alive(server), "the Prefect server outlived its run"
    finally:
        for pid in (run.pid, server):
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_lvd_says_what_run_starts():
    from flows.cli import build_parser

    help_text = " ".join(build_parser().format_help().split())  # argparse wraps lines
    assert "or by a private local Prefect server that stops with the run" in help_text
