"""`lvd report` on a whole small-demo run, opened in headless Chromium over the DevTools protocol.

The page must load, every <img> must decode (naturalWidth > 0, which only a real browser can tell), and
the console must stay free of errors. A second page with a broken picture and a console error checks
that the harness would notice both.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from flows.cli import main
from flows.curate_and_train import ABLATE_DATA, CURATE_AND_TRAIN
from flows.dag import run_pipeline
from flows.report import PAGE_TITLE
from pipelines.stage import StageRun
from tests.integration.demo_dag import small_demo_dag
from training.eval.pca_picture import TILE_PIXELS
from training.stages import PCA_IMAGE_COUNT

CHROMIUM = "chromium"
STARTUP_TIMEOUT_S = 30.0
MESSAGE_TIMEOUT_S = 30.0
POLL_S = 0.05
PORT_FILE = "DevToolsActivePort"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",  # no calls home: they would log errors on an offline machine
    "--remote-debugging-port=0",
)
ABLATION_SEED = 7
IMAGES_STATE = "JSON.stringify(Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]))"
BROKEN_PAGE = (
    "<!DOCTYPE html><html><head><title>broken</title></head><body>"
    '<img alt="broken" src="data:image/png;base64,bm90IGEgcG5n">'
    "<script>console.error('deliberate')</script></body></html>"
)


class DevTools:
    """A minimal Chrome DevTools protocol client on one page target: commands, and the events seen."""

    def __init__(self, socket: ClientConnection):
        self.socket = socket
        self.events: list[dict[str, Any]] = []
        self._last_id = 0

    def _receive(self) -> dict[str, Any]:
        return json.loads(self.socket.recv(timeout=MESSAGE_TIMEOUT_S))

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._last_id += 1
        self.socket.send(json.dumps({"id": self._last_id, "method": method, "params": params}))
        while True:
            message = self._receive()
            if message.get("id") == self._last_id:
                assert "error" not in message, f"{method}: {message['error']}"
                return message["result"]
            self.events.append(message)

    def wait_for(self, event: str, after: int) -> None:
        """Waits for `event` among the events from index `after` on."""
        while not any(seen.get("method") == event for seen in self.events[after:]):
            self.events.append(self._receive())

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"]["value"]

    def open(self, url: str) -> None:
        """Navigates and waits for the load event (every image fetched and decoded or failed)."""
        start = len(self.events)
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired", start)


def console_errors(events: list[dict[str, Any]]) -> list[str]:
    """Console errors, uncaught exceptions and browser log errors (failed loads among them)."""
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params["type"] == "error":
            errors.append(" ".join(str(arg.get("value", arg.get("description"))) for arg in params["args"]))
        elif method == "Runtime.exceptionThrown":
            errors.append(params["exceptionDetails"].get("text", "exception"))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            errors.append(params["entry"]["text"])
    return errors


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[DevTools]:
    binary = shutil.which(CHROMIUM)
    assert binary, "chromium is not installed: `make system-deps` (or apt-get install chromium) adds it"
    profile = tmp_path_factory.mktemp("chromium-profile")
    process = subprocess.Popen(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / PORT_FILE
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not (port_file.exists() and port_file.read_text().strip()):
            assert process.poll() is None and time.monotonic() < deadline, "chromium did not start"
            time.sleep(POLL_S)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/json/list", timeout=MESSAGE_TIMEOUT_S
        ) as answer:
            page = next(target for target in json.load(answer) if target["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None) as socket:
            devtools = DevTools(socket)
            for domain in ("Page", "Runtime", "Log"):
                devtools.call(f"{domain}.enable")
            yield devtools
    finally:
        process.terminate()
        process.wait(timeout=STARTUP_TIMEOUT_S)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict[str, StageRun]]:
    """The whole small-demo DAG (shared with other tests) and its data ablation (reused when another
    test made it), then `lvd report` on its config; returns the page and every stage's run."""
    shared, first = small_demo_dag(tmp_path_factory.getbasetemp())
    # Why seeds of their own: the ablation's keys (random and balanced arms) stay apart from those of
    # test_ablate_data, which expects to compute its ablation itself, whichever module runs first.
    cfg = dataclasses.replace(
        shared,
        ablate_data=dataclasses.replace(shared.ablate_data, seed=ABLATION_SEED),
        balance=dataclasses.replace(shared.balance, seed=ABLATION_SEED),
    )
    upstream = CURATE_AND_TRAIN.branch_upstream(ABLATE_DATA)
    runs = {**first, **run_pipeline(CURATE_AND_TRAIN, cfg, until=upstream, branches=[ABLATE_DATA])}
    folder = tmp_path_factory.mktemp("report")
    config_file = folder / "job.json"
    config_file.write_text(json.dumps(dataclasses.asdict(cfg)))  # rebuilds the same config, hence keys
    out = folder / "report.html"
    assert main(["report", "--config", str(config_file), "--out", str(out)]) == 0
    return out, runs


def test_harness_notices_a_broken_image_and_a_console_error(browser, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(BROKEN_PAGE)
    start = len(browser.events)
    browser.open(page.as_uri())
    assert json.loads(browser.evaluate(IMAGES_STATE)) == [["broken", True, 0]]
    assert "deliberate" in console_errors(browser.events[start:])


def test_report_loads_every_image_decodes_and_the_console_stays_clean(browser, report):
    out, runs = report
    start = len(browser.events)
    browser.open(out.as_uri())
    assert browser.evaluate("document.title") == PAGE_TITLE
    images = json.loads(browser.evaluate(IMAGES_STATE))
    undecoded = [alt for alt, complete, width in images if not (complete and width > 0)]
    assert not undecoded, f"images that did not decode: {undecoded}"
    # One picture per PNG artifact of the committed stages, plus the PCA picture of each pretraining
    # (curated, random and balanced data), as wide as the images it shows.
    pictures = sum(name.endswith(".png") for run in runs.values() for name in run.record["artifacts"])
    pretrainings = ("pretrain", "pretrain_random", "pretrain_balanced")
    assert len(images) == pictures + len(pretrainings)
    pca = sorted(width for alt, _, width in images if "PCA components" in alt)
    trained_on = [runs[stage].inputs["curated"].read() for stage in pretrainings]
    distinct = [len(set(table.column("image_id").to_pylist())) for table in trained_on]
    assert pca == sorted(min(PCA_IMAGE_COUNT, count) * TILE_PIXELS for count in distinct)
    assert console_errors(browser.events[start:]) == []
    # Every stage of this run is committed, the ablation's too, so no section says "not run".
    assert browser.evaluate("document.body.innerText.includes('not run')") is False
