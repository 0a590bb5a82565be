"""The private Prefect server of an `lvd run`: started for the run, and gone with it however it ends.

    lvd run (no PREFECT_API_URL) --> uvicorn serving Prefect's API app on 127.0.0.1:<free port>,
      a child that the kernel stops when lvd dies (PR_SET_PDEATHSIG), even by kill -9
      --> the flow talks to it for the run --> stopped (SIGTERM, then SIGKILL) when the run ends

Why not Prefect's own temporary server: it is stopped by an atexit hook, which neither SIGKILL nor a
default SIGTERM runs, so it outlived a killed run (~200 MB each). With PREFECT_API_URL set, the run
uses that server and starts none.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

API_URL_ENV = "PREFECT_API_URL"
HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
POLL_S = 0.2
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): a signal for this process when its parent dies
# What Prefect sets for its own temporary server: no UI, an ephemeral, final server.
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


class ServerStartError(RuntimeError):
    """The private Prefect server did not answer in time."""


def _stop_with_parent() -> None:
    """In the child, before exec: the kernel sends SIGTERM to it when the parent (lvd) dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _wait_healthy(process: subprocess.Popen, api_url: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServerStartError(f"the local Prefect server exited with status {process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{api_url}/health").status_code == httpx.codes.OK:
                    return
            time.sleep(POLL_S)
    raise ServerStartError(f"the local Prefect server did not answer at {api_url} in {STARTUP_TIMEOUT_S} s")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def run_server() -> Iterator[str]:
    """The API URL of a Prefect server for this run: $PREFECT_API_URL's, or a private one tied to this
    process (Prefect's settings point at it while the block runs)."""
    if os.environ.get(API_URL_ENV):
        yield os.environ[API_URL_ENV]
        return
    import prefect
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = _free_port()
    api_url = f"http://{HOST}:{port}/api"
    command = [
        sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
        "--factory", "prefect.server.api.server:create_app", "--host", HOST, "--port", str(port),
        "--log-level", "error", "--lifespan", "on",
    ]  # fmt: skip
    # PR_SET_PDEATHSIG is Linux's; elsewhere the server is stopped by `finally` (not after kill -9).
    tie = _stop_with_parent if sys.platform.startswith("linux") else None
    process = subprocess.Popen(command, env={**os.environ, **SERVER_ENV}, preexec_fn=tie)
    try:
        _wait_healthy(process, api_url)
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            try:
                yield api_url
            finally:
                _drain_prefect_workers()
    finally:
        _stop(process)


def _drain_prefect_workers() -> None:
    """Sends the run's last logs and events while the server still listens."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=STOP_TIMEOUT_S)
