"""Two runs on one store at once, sharing upstream stages: both succeed, the shared stage is computed
once (the second run waits for it, then reuses it), and no writer's files are swept from under it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import write_folder

REPO = Path(__file__).resolve().parents[2]
NUM_IMAGES = 120
IMAGE_SIDE = 384  # large enough that ingest takes seconds: the two runs overlap
FILES_PER_SHARD = 2  # many shards, many temp files in flight
RUN_TIMEOUT_S = 300
DRIVER = """
import json, sys
from flows.curate_and_train import CURATE_AND_TRAIN
from flows.dag import run_pipeline
cfg = CURATE_AND_TRAIN.build_config(json.loads(open(sys.argv[1]).read()))
runs = run_pipeline(CURATE_AND_TRAIN, cfg, until="exact_dedup")
digests = {stage: {name: m.digest for name, m in run.outputs.items()} for stage, run in runs.items()}
print(json.dumps({"reused": {stage: run.reused for stage, run in runs.items()}, "digests": digests}))
"""


@pytest.mark.timeout(2 * RUN_TIMEOUT_S)
def test_two_runs_sharing_upstream_stages_both_succeed_and_compute_it_once(tmp_path):
    write_folder(tmp_path / "images", range(NUM_IMAGES), size=(IMAGE_SIDE, IMAGE_SIDE))
    store = tmp_path / "store"
    configs = []
    for prefer_larger in (True, False):  # exact_dedup differs; ingest is shared
        config = tmp_path / f"job-{prefer_larger}.json"
        config.write_text(
            json.dumps(
                {
                    "store": str(store),
                    "runtime": {"executor": "serial", "show_progress": False},
                    "ingest": {
                        "sources": [
                            {
                                "name": "pool",
                                "role": "uncurated",
                                "kind": "folder",
                                "path": str(tmp_path / "images"),
                            }
                        ],
                        "files_per_shard": FILES_PER_SHARD,
                    },
                    "exact_dedup": {"keep": {"prefer_larger": prefer_larger}},
                }
            )
        )
        configs.append(config)
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    runs = [
        subprocess.Popen([sys.executable, "-c", DRIVER, str(config)], cwd=REPO, **pipes) for config in configs
    ]
    outcomes = [run.communicate(timeout=RUN_TIMEOUT_S) for run in runs]
    for run, (_, err) in zip(runs, outcomes, strict=True):
        assert run.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outcomes]
    assert sorted(result["reused"]["ingest"] for result in results) == [False, True]
    assert results[0]["digests"]["ingest"] == results[1]["digests"]["ingest"]
    assert all(not result["reused"]["exact_dedup"] for result in results)
    assert not list(store.rglob("*.tmp-*"))
