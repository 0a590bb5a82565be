"""FSDP2 on two gloo processes equals one process on the same global batch; training resumes across
world sizes. Real `torchrun`, CPU only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipelines.datasets import write_fashion_mnist_pngs
from pipelines.stage import config_to_dict
from tests.training_helpers import tiny_pretrain_config
from training.checkpoint import latest_checkpoint
from training.run_metrics import read_metrics
from training.trainer import CHECKPOINTS_DIR, train

REPO = Path(__file__).resolve().parents[2]
TORCHRUN_TIMEOUT_S = 300
LOSS_TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-5


def torchrun(processes: int, *args: str) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run(command, check=True, cwd=REPO, env=env, timeout=TORCHRUN_TIMEOUT_S)


def run_worker(processes: int, out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    torchrun(processes, str(REPO / "tests" / "integration" / "fsdp_worker.py"), str(out))
    return json.loads(out.read_text()), torch.load(out.with_suffix(".pt"), weights_only=True)


@pytest.mark.timeout(600)
def test_two_fsdp2_processes_match_one_process_on_the_same_global_batch(tmp_path):
    one, one_grads = run_worker(1, tmp_path / "one.json")
    two, two_grads = run_worker(2, tmp_path / "two.json")
    # Each rank holds about half of the student's parameters (dim-0 shards; tiny tensors split unevenly).
    assert set(two["held_share"]) == {"held_0", "held_1"}
    for share in two["held_share"].values():
        assert 0.4 < share < 0.6
    assert one["held_share"]["held_0"] == pytest.approx(1.0)
    for name in ("dino_local_crops_loss", "dino_global_crops_loss", "objective"):
        assert two["losses"][name] == pytest.approx(one["losses"][name], abs=LOSS_TOLERANCE), name
    assert one_grads.keys() == two_grads.keys()
    for name, gradient in one_grads.items():
        torch.testing.assert_close(two_grads[name], gradient, atol=GRAD_TOLERANCE, rtol=1e-4, msg=name)


@pytest.mark.timeout(600)
def test_a_two_process_run_resumes_in_one_process(tmp_path):
    images = write_fashion_mnist_pngs(tmp_path / "images", 16)
    cfg = tiny_pretrain_config(train={"max_steps": 3})
    config_path = tmp_path / "pretrain.json"
    config_path.write_text(json.dumps(config_to_dict(cfg)))
    manifest = tmp_path / "images.parquet"
    pq.write_table(images, manifest)
    run_dir = tmp_path / "run"
    torchrun(
        2,
        "-m",
        "training.launch",
        "--config",
        str(config_path),
        "--images",
        str(manifest),
        "--out",
        str(run_dir),
    )
    assert latest_checkpoint(run_dir / CHECKPOINTS_DIR).name == "step_00000003"
    resumed = train(tiny_pretrain_config(train={"max_steps": 5}), images, run_dir, show_progress=False)
    assert resumed.resumed_from == 3
    assert read_metrics(run_dir).column("step").to_pylist() == [0, 1, 2, 3, 4]
