"""No code runs from a checkpoint folder a user names: DCP's pickled `.metadata` is read restricted."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from distillation.teacher import load_checkpoint_teacher
from pipelines.datasets import write_fashion_mnist_pngs
from tests.training_helpers import tiny_pretrain_config
from training.checkpoint import LATEST_FILE, latest_checkpoint, load_initial_weights, read_model_tensors
from training.dcp_metadata import UnsafeCheckpointError
from training.ssl import SSLMetaArch
from training.trainer import CHECKPOINTS_DIR, train

METADATA_FILE = ".metadata"


class RunsAShellCommand:
    """What an attacker pickles: unpickling it calls os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """A real lvd checkpoint root: a one-step tiny pretraining run."""
    root = tmp_path_factory.mktemp("dcp")
    images = write_fashion_mnist_pngs(root / "images", 8)
    train(tiny_pretrain_config(train={"max_steps": 1}), images, root / "run", show_progress=False)
    return root / "run" / CHECKPOINTS_DIR


@pytest.fixture
def crafted(checkpoints, tmp_path) -> tuple[Path, Path]:
    """A copy of the checkpoint whose `.metadata` would run a shell command; and the marker it touches."""
    root = tmp_path / "crafted"
    shutil.copytree(checkpoints, root)
    marker = tmp_path / "pwned"
    step = latest_checkpoint(root)
    (step / METADATA_FILE).write_bytes(pickle.dumps(RunsAShellCommand(marker)))
    return root, marker


def test_lvds_own_checkpoints_load_through_the_restricted_reader(checkpoints):
    tensors = read_model_tensors(latest_checkpoint(checkpoints), "teacher.")
    assert tensors and all(isinstance(tensor, torch.Tensor) for tensor in tensors.values())
    assert set(load_checkpoint_teacher(checkpoints).modules) == {"backbone", "dino_head"}


@pytest.mark.parametrize(
    "load",
    [
        lambda root: read_model_tensors(latest_checkpoint(root)),
        load_checkpoint_teacher,  # distill.teacher_source naming a folder
        # pretrain.train.init_from naming a folder
        lambda root: load_initial_weights(SSLMetaArch(tiny_pretrain_config()), root, grid=4),
    ],
    ids=["read_model_tensors", "distill_teacher", "init_from"],
)
def test_a_crafted_metadata_file_is_refused_with_one_line_and_runs_nothing(crafted, load):
    root, marker = crafted
    with pytest.raises(UnsafeCheckpointError) as error:
        load(root)
    message = str(error.value)
    assert "\n" not in message and f"{latest_checkpoint(root)}/{METADATA_FILE}" in message
    assert "posix.system" in message and "not checkpoint metadata" in message
    assert not marker.exists(), "the crafted metadata ran a command"
    assert (root / LATEST_FILE).is_file()  # the folder is still a checkpoint root: only its contents lie
