"""Distillation: from an lvd checkpoint (heads) and from a hub-format file (features), resume, exports."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from distillation.config import DistillConfig
from distillation.meta_arch import DistillMetaArch
from distillation.stage import distill, save_random_init
from distillation.teacher import load_checkpoint_teacher, load_hub_teacher
from pipelines.config import build_config
from tests.training_helpers import tiny_distill_section
from training.checkpoint import export_backbone
from training.data.dataset import make_train_loader
from training.exports import export_row, load_exported_backbone
from training.health import feature_signals
from training.models.vit import build_vit
from training.run_metrics import read_metrics
from training.trainer import CHECKPOINTS_DIR

# Cosine distance 1 - cos is 1 for orthogonal features; random maps stay well away from agreement (0).
MIN_UNTRAINED_DISTANCE = 0.5
LOSS_COLUMNS = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "objective")


def distill_config(teacher_source, max_steps: int, **options):
    data = {**tiny_distill_section(max_steps), "teacher_source": str(teacher_source), **options}
    return build_config(DistillConfig, data, "distill")


def student_export(run_dir, out):
    return torch.load(
        export_backbone(run_dir / CHECKPOINTS_DIR, out, module="student_ema"), weights_only=True
    )


def test_the_checkpoint_teacher_is_the_pretrained_ema_teacher_and_frozen(pretrained, tmp_path):
    _, checkpoints = pretrained
    teacher = load_checkpoint_teacher(checkpoints)
    exported = torch.load(export_backbone(checkpoints, tmp_path / "t.pth"), weights_only=True)
    for name, tensor in teacher.modules["backbone"].state_dict().items():
        assert torch.equal(tensor, exported[name]), name
    assert {"backbone", "dino_head"} <= set(teacher.modules)
    assert not any(p.requires_grad for p in teacher.modules.parameters())


def test_distillation_resumes_exactly_and_never_moves_the_teacher(pretrained, tmp_path):
    images, checkpoints = pretrained
    teacher_before = {
        k: v.clone() for k, v in load_checkpoint_teacher(checkpoints).modules.state_dict().items()
    }
    distill(distill_config(checkpoints, 4), images, tmp_path / "straight", show_progress=False)
    distill(distill_config(checkpoints, 2), images, tmp_path / "resumed", show_progress=False)
    distill(distill_config(checkpoints, 4), images, tmp_path / "resumed", show_progress=False)
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert resumed.column("step").to_pylist() == [0, 1, 2, 3]
    for name in LOSS_COLUMNS:
        assert resumed.column(name).to_pylist() == straight.column(name).to_pylist(), name
    expected = student_export(tmp_path / "straight", tmp_path / "a.pth")
    actual = student_export(tmp_path / "resumed", tmp_path / "b.pth")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    # The distilled student's EMA loads strict into the student architecture.
    build_vit("vit_test", patch_size=7, img_size=28).load_state_dict(expected, strict=True)
    teacher_after = load_checkpoint_teacher(checkpoints).modules.state_dict()
    assert all(torch.equal(teacher_before[name], teacher_after[name]) for name in teacher_before)


def test_ibot_scores_every_patch_of_the_unmasked_global_crops(pretrained):
    _, checkpoints = pretrained
    cfg = distill_config(checkpoints, 1)
    model = DistillMetaArch(cfg, load_checkpoint_teacher(checkpoints), "heads")
    masks = torch.zeros(6, 16, dtype=torch.bool)
    student_masks, indices, weights = model.ibot_positions({"collated_masks": masks}, torch.device("cpu"))
    assert student_masks is None
    assert indices.tolist() == list(range(96))
    # Each image's weights sum to 1: per-image means, as the masked iBOT loss takes them.
    assert torch.allclose(weights.view(6, 16).sum(1), torch.ones(6))


def test_a_hub_format_backbone_file_distills_by_feature_matching(pretrained, tmp_path):
    images, _ = pretrained
    torch.manual_seed(3)
    hub_file = tmp_path / "dinov2_vit_test_pretrain.pth"
    torch.save(build_vit("vit_test", patch_size=7, img_size=56, layerscale_init=1.0).state_dict(), hub_file)
    teacher_arch = {"arch": "vit_test", "patch_size": 7, "drop_path_rate": 0.0}
    cfg = distill_config(hub_file, 2, teacher_arch=teacher_arch)
    assert cfg.objective == "auto"
    distill(cfg, images, tmp_path / "run", show_progress=False)
    metrics = read_metrics(tmp_path / "run")
    assert metrics.num_rows == 2
    # Step 0 logs the untrained student's cosine distances to the teacher's features on batch 0:
    # recomputed here from both models' outputs with 1 - a.b / (|a| |b|) written out.
    expected, student_cls = untrained_feature_distances(cfg, hub_file, images)
    for name, value in expected.items():
        assert metrics.column(name)[0].as_py() == pytest.approx(value, rel=1e-5), name
    # Its health: the spread of the same CLS features; no prototypes, so no teacher-side signals.
    for name, value in feature_signals(student_cls).items():
        assert metrics.column(name)[0].as_py() == pytest.approx(value, rel=1e-4), name
    assert metrics.column("teacher_entropy").null_count == metrics.column("prototype_usage").null_count == 2
    # Random projections point anywhere: an untrained student is far from the teacher's features.
    assert all(value > MIN_UNTRAINED_DISTANCE for value in expected.values()), expected
    # The same file with freshly initialised frozen heads runs the paper's objective as well.
    heads = dataclasses.replace(cfg, objective="heads")
    distill(heads, images, tmp_path / "heads", show_progress=False)
    assert read_metrics(tmp_path / "heads").num_rows == 2
    teacher = load_hub_teacher(hub_file, cfg, with_heads=False)
    assert teacher.options["img_size"] == 56  # the grid its position table was made for


def _cosine_distance(student: np.ndarray, teacher: np.ndarray) -> float:
    dots = (student * teacher).sum(axis=-1)
    norms = np.linalg.norm(student, axis=-1) * np.linalg.norm(teacher, axis=-1)
    return float((1 - dots / norms).mean())


def untrained_feature_distances(
    cfg: DistillConfig, hub_file, images
) -> tuple[dict[str, float], torch.Tensor]:
    """CLS and patch cosine distances of the initial student (as the trainer seeds and builds it) to the
    teacher's normed features, on the first training batch; and the student's CLS features there."""
    teacher = load_hub_teacher(hub_file, cfg, with_heads=False)
    torch.manual_seed(cfg.recipe.train.seed)
    model = DistillMetaArch(cfg, teacher, "features")
    loader = make_train_loader(images, cfg.recipe, rank=0, world_size=1, start_step=0, num_workers=0)
    crops = next(loader)["collated_global_crops"]
    with torch.no_grad():
        target = teacher.modules["backbone"](crops, is_training=True)
        own = model.student["backbone"](crops, is_training=True)
        head = model.student["feature_head"]
        cls, patches = head.cls_proj(own["x_norm_clstoken"]), head.patch_proj(own["x_norm_patchtokens"])
    distances = {
        "dino_global_crops_loss": _cosine_distance(cls.numpy(), target["x_norm_clstoken"].numpy()),
        "ibot_loss": _cosine_distance(patches.numpy(), target["x_norm_patchtokens"].numpy()),
    }
    return distances, own["x_norm_clstoken"]


def test_the_random_init_export_is_the_students_starting_point(pretrained, tmp_path):
    _, checkpoints = pretrained
    cfg = distill_config(checkpoints, 1)
    row = export_row("student_random_init", save_random_init(cfg.recipe, tmp_path / "init.pth"))
    baseline = load_exported_backbone(row).state_dict()
    teacher = load_checkpoint_teacher(checkpoints)  # loaded before training seeds and builds the student
    torch.manual_seed(cfg.recipe.train.seed)
    student = DistillMetaArch(cfg, teacher, "heads").student["backbone"]
    assert all(torch.equal(baseline[name], tensor) for name, tensor in student.state_dict().items())


def test_a_student_that_cannot_score_the_teachers_prototypes_is_refused(pretrained):
    _, checkpoints = pretrained
    data = tiny_distill_section(1)
    data["recipe"]["dino"] = {**data["recipe"]["dino"], "head_n_prototypes": 64}
    data["recipe"]["ibot"] = {**data["recipe"]["ibot"], "head_n_prototypes": 64}
    cfg = build_config(DistillConfig, {**data, "teacher_source": str(checkpoints)}, "distill")
    with pytest.raises(ValueError, match="head_n_prototypes to 32/32"):
        DistillMetaArch(cfg, load_checkpoint_teacher(checkpoints), "heads")
