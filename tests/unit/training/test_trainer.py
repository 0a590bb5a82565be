"""The training loop: resume equals an unbroken run, the export loads strict, the stage commits."""

from __future__ import annotations

import torch

from pipelines.datasets import write_fashion_mnist_pngs
from tests.training_helpers import tiny_pretrain_config
from training.checkpoint import export_backbone, latest_checkpoint, load_initial_weights, resize_pos_embed
from training.models.vit import build_vit
from training.parallel import init_distributed, local_tensor, shutdown
from training.ssl import build_backbone
from training.trainer import CHECKPOINTS_DIR, build_model, train

LOSS_COLUMNS = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "objective")


def teacher_weights(run_dir) -> dict[str, torch.Tensor]:
    out = run_dir / "backbone.pth"
    export_backbone(run_dir / CHECKPOINTS_DIR, out)
    return torch.load(out, weights_only=True)


def test_resumed_run_repeats_the_unbroken_run_exactly(tmp_path):
    images = write_fashion_mnist_pngs(tmp_path / "images", 16)
    straight = train(
        tiny_pretrain_config(train={"max_steps": 6}), images, tmp_path / "straight", show_progress=False
    )
    first = train(
        tiny_pretrain_config(train={"max_steps": 3}), images, tmp_path / "resumed", show_progress=False
    )
    assert first.steps == 3
    assert latest_checkpoint(tmp_path / "resumed" / CHECKPOINTS_DIR).name == "step_00000003"
    second = train(
        tiny_pretrain_config(train={"max_steps": 6}), images, tmp_path / "resumed", show_progress=False
    )
    assert second.resumed_from == 3

    assert straight.metrics.column("step").to_pylist() == list(range(6))
    assert second.metrics.column("step").to_pylist() == list(range(6))
    for name in LOSS_COLUMNS:
        assert second.metrics.column(name).to_pylist() == straight.metrics.column(name).to_pylist(), name
    expected, actual = teacher_weights(tmp_path / "straight"), teacher_weights(tmp_path / "resumed")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_training_moves_the_teacher_and_logs_the_schedules(tmp_path):
    images = write_fashion_mnist_pngs(tmp_path / "images", 16)
    cfg = tiny_pretrain_config(train={"max_steps": 4})
    result = train(cfg, images, tmp_path / "run", show_progress=False)
    metrics = result.metrics.to_pydict()
    # Warmup is one epoch (2 steps) from 0 with endpoint: lr = [0, peak, cosine...]; peak = base*sqrt(4/1024).
    peak = 0.05 * (4 / 1024) ** 0.5
    assert metrics["lr"][0] == 0.0
    assert abs(metrics["lr"][1] - peak) < 1e-12
    # The last layer is frozen for freeze_last_layer_epochs (2 steps).
    assert metrics["last_layer_lr"][:2] == [0.0, 0.0]
    assert all(value > 0 for value in metrics["objective"])
    torch.manual_seed(cfg.train.seed)
    initial = build_backbone(cfg, drop_path_rate=cfg.student.drop_path_rate).state_dict()
    exported = teacher_weights(tmp_path / "run")
    build_vit("vit_test", patch_size=7, img_size=28).load_state_dict(exported, strict=True)
    # The EMA teacher moved away from the shared initial weights (the student took 3 non-zero lr steps).
    moved = [name for name in initial if not torch.equal(initial[name], exported[name])]
    assert "blocks.0.attn.qkv.weight" in moved


def test_the_high_resolution_phase_starts_from_the_earlier_run_with_a_resized_position_table(tmp_path):
    images = write_fashion_mnist_pngs(tmp_path / "images", 16)
    train(tiny_pretrain_config(train={"max_steps": 2}), images, tmp_path / "low", show_progress=False)
    low = teacher_weights(tmp_path / "low")
    # 42-px global crops: a 6 x 6 grid instead of 4 x 4; the run starts from the 28-px checkpoint.
    high_cfg = tiny_pretrain_config(
        crops={"global_crops_size": 42},
        train={"max_steps": 1, "init_from": str(tmp_path / "low" / CHECKPOINTS_DIR)},
    )
    env = init_distributed("cpu")
    try:
        model = build_model(high_cfg, env)
        load_initial_weights(model, high_cfg.train.init_from, grid=6)
        teacher = {name: local_tensor(p).detach() for name, p in model.teacher["backbone"].named_parameters()}
    finally:
        shutdown(env)
    assert teacher["pos_embed"].shape == (1, 1 + 36, 64)
    torch.testing.assert_close(teacher["pos_embed"], resize_pos_embed(low["pos_embed"], 6))
    for name, tensor in low.items():
        if name != "pos_embed":
            assert torch.equal(teacher[name], tensor), name
    # And the whole loop runs from there at the new resolution.
    result = train(high_cfg, images, tmp_path / "high", show_progress=False)
    assert result.metrics.num_rows == 1
