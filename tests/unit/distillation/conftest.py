"""The tiny pretrained teacher every distillation test distills from (trained once per session)."""

from __future__ import annotations

import pytest

from pipelines.datasets import write_fashion_mnist_pngs
from tests.training_helpers import tiny_pretrain_config
from training.trainer import CHECKPOINTS_DIR, train


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """(images manifest, the checkpoints folder of a 3-step tiny pretraining on them)."""
    root = tmp_path_factory.mktemp("pretrained")
    images = write_fashion_mnist_pngs(root / "images", 16)
    train(tiny_pretrain_config(train={"max_steps": 3}), images, root / "run", show_progress=False)
    return images, root / "run" / CHECKPOINTS_DIR
