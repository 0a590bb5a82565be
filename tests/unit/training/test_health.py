"""Training health: closed-form signal values, and a run fed NaN stops naming the term and its cause."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.datasets import write_fashion_mnist_pngs
from tests.training_helpers import tiny_pretrain_config
from training.health import (
    HEALTH_COLUMNS,
    TrainingDiverged,
    check_finite,
    feature_signals,
    prototype_signals,
)
from training.run_metrics import METRICS_DIR
from training.ssl import SSLMetaArch
from training.trainer import CHECKPOINTS_DIR, train

PROTOTYPES = 8
ROWS = 4
FINITE_LOSSES = {
    "dino_local_crops_loss": 1.0,
    "dino_global_crops_loss": 1.0,
    "koleo_loss": 0.1,
    "ibot_loss": 1.0,
    "objective": 3.1,
}


def test_uniform_targets_have_entropy_one_and_one_hot_targets_zero():
    uniform = torch.full((2, ROWS, PROTOTYPES), 1.0 / PROTOTYPES)
    assert prototype_signals(uniform)["teacher_entropy"] == pytest.approx(1.0, abs=1e-6)
    one_hot = torch.eye(PROTOTYPES)[torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])].reshape(2, ROWS, PROTOTYPES)
    signals = prototype_signals(one_hot)
    assert signals["teacher_entropy"] == pytest.approx(0.0, abs=1e-9)
    # 8 rows on 4 distinct prototypes, out of min(8 prototypes, 8 rows) = 8.
    assert signals["prototype_usage"] == pytest.approx(4 / 8)


def test_half_and_half_targets_have_entropy_log2_over_logk_and_collapsed_ones_use_one_prototype():
    halves = torch.zeros(ROWS, PROTOTYPES)
    halves[:, :2] = 0.5
    halves[:, 0] += 1e-3  # a strict argmax: prototype 0 for every row
    halves[:, 1] -= 1e-3
    signals = prototype_signals(halves)
    expected = -(0.501 * math.log(0.501) + 0.499 * math.log(0.499)) / math.log(PROTOTYPES)
    assert signals["teacher_entropy"] == pytest.approx(expected, rel=1e-5)
    assert signals["prototype_usage"] == pytest.approx(1 / ROWS)


def test_identical_features_are_a_collapse_and_orthonormal_ones_span_all_but_the_mean():
    collapsed = feature_signals(torch.ones(6, 5))
    assert collapsed == {"cls_std": 0.0, "cls_rank": 1.0}
    dim = 6
    # One-hot rows: each dimension holds one 1 and dim - 1 zeros, unbiased std 1 / sqrt(dim), scaled to 1;
    # centred, they leave dim - 1 equal singular values (the mean direction is gone): effective rank 5.
    spread = feature_signals(torch.eye(dim) * 3.0)  # the scale is normalised away
    assert spread["cls_std"] == pytest.approx(1.0, rel=1e-5)
    assert spread["cls_rank"] == pytest.approx(dim - 1, rel=1e-4)


def test_an_infinite_koleo_names_koleo_and_duplicate_images():
    with pytest.raises(TrainingDiverged, match=r"step 7: koleo_loss is inf.*exact duplicate images"):
        check_finite(7, {**FINITE_LOSSES, "koleo_loss": math.inf, "objective": math.inf}, {"backbone": 1.0})


def test_the_first_non_finite_term_is_named_and_the_rest_listed():
    losses = {
        **FINITE_LOSSES,
        "dino_global_crops_loss": math.nan,
        "ibot_loss": math.nan,
        "objective": math.nan,
    }
    with pytest.raises(TrainingDiverged) as caught:
        check_finite(3, losses, {"backbone": math.nan})
    message = str(caught.value)
    assert message.startswith("training diverged at step 3: dino_global_crops_loss is nan")
    assert "also non-finite: ibot_loss, objective, grad_norm_backbone" in message
    assert "optim.base_lr" in message


def test_a_gradient_overflow_with_finite_losses_names_the_submodule():
    with pytest.raises(TrainingDiverged, match="gradient norm of the student's dino_head is inf"):
        check_finite(0, FINITE_LOSSES, {"backbone": 2.0, "dino_head": math.inf})
    check_finite(0, FINITE_LOSSES, {"backbone": 2.0, "dino_head": 0.5})  # finite: nothing raised


def test_a_run_fed_nan_stops_at_its_first_step_naming_the_term_and_saves_nothing(tmp_path):
    images = write_fashion_mnist_pngs(tmp_path / "images", 8)
    cfg = tiny_pretrain_config(train={"max_steps": 3})

    def poisoned_heads() -> SSLMetaArch:
        # NaN in the DINO head's last layer (student and its teacher copy): the backbone's CLS, and so
        # KoLeo, stays finite while every prototype score is NaN.
        model = SSLMetaArch(cfg)
        for part in (model.student, model.teacher):
            with torch.no_grad():
                part["dino_head"].last_layer.weight_v.fill_(math.nan)
        return model

    with pytest.raises(TrainingDiverged, match=r"step 0: dino_local_crops_loss is nan \(also non-finite:"):
        train(cfg, images, tmp_path / "run", show_progress=False, model_factory=poisoned_heads)
    assert not list((tmp_path / "run" / CHECKPOINTS_DIR).glob("step_*"))
    assert not (tmp_path / "run" / METRICS_DIR).exists()


def test_every_pretraining_step_logs_the_health_signals(tmp_path):
    images = write_fashion_mnist_pngs(tmp_path / "images", 8)
    result = train(
        tiny_pretrain_config(train={"max_steps": 2}), images, tmp_path / "run", show_progress=False
    )
    for name in HEALTH_COLUMNS:
        assert result.metrics.column(name).null_count == 0, name
    # 2 global crops x 4 images = 8 target rows over 32 prototypes: usage counts out of min(32, 8).
    usage = result.metrics.column("prototype_usage").to_pylist()
    assert all(round(value * 8) == pytest.approx(value * 8) for value in usage), usage
