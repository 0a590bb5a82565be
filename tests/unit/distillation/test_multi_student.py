"""Several students distilled in one run: each ends exactly as its own run would, for one teacher
forward per batch."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

import distillation  # noqa: F401  (registers the distill stage)
from distillation.config import DistillConfig
from distillation.meta_arch import SharedTeacherOutputs
from distillation.stage import DISTILL_METRICS, distill, student_run_dir
from pipelines.config import build_config
from pipelines.manifest import CURATED
from pipelines.stage import get_stage, run_stage
from pipelines.store import Store
from tests.training_helpers import tiny_distill_section, tiny_pretrain_config
from tests.unit.curation.embedding_data import write_manifest
from training.checkpoint import export_backbone
from training.exports import EXPORTS, load_exported_backbone, read_exports
from training.run_metrics import read_metrics
from training.ssl import SSLMetaArch
from training.stages import TEACHER_MODEL
from training.trainer import CHECKPOINTS_DIR, TrainedModel, train_together

STEPS = 4
# Two backbones on the teacher's 7-px patch grid: the tiny test ViT and the 4-block demo ViT.
STUDENTS = (
    {"name": "narrow", "student": {"arch": "vit_test", "patch_size": 7, "drop_path_rate": 0.0}},
    {"name": "wide", "student": {"arch": "vit_demo", "patch_size": 7, "drop_path_rate": 0.0}},
)
LOSS_COLUMNS = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "objective")


def config(checkpoints, students) -> DistillConfig:
    data = {**tiny_distill_section(STEPS), "teacher_source": str(checkpoints), "students": list(students)}
    return build_config(DistillConfig, data, "distill")


def student_weights(run_dir, out) -> dict[str, torch.Tensor]:
    path = export_backbone(run_dir / CHECKPOINTS_DIR, out, module="student_ema")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def runs(pretrained, tmp_path_factory, request):
    """The two students in one run, and each in a run of its own; teacher forwards counted per run."""
    images, checkpoints = pretrained
    root = tmp_path_factory.mktemp("multi")
    calls = []
    original = SSLMetaArch.teacher_logits
    patch = pytest.MonkeyPatch()
    patch.setattr(SSLMetaArch, "teacher_logits", lambda self, *args: calls.append(1) or original(self, *args))
    request.addfinalizer(patch.undo)
    together = config(checkpoints, STUDENTS)
    distill(together, images, root / "together", show_progress=False)
    forwards = {"together": len(calls)}
    for student in STUDENTS:
        calls.clear()
        distill(config(checkpoints, [student]), images, root / student["name"], show_progress=False)
        forwards[student["name"]] = len(calls)
    return together, root, forwards


def test_each_student_of_a_joint_run_ends_with_the_weights_of_its_own_run(runs, tmp_path):
    together, root, _ = runs
    for student in STUDENTS:
        name = student["name"]
        joint = student_weights(
            student_run_dir(together, root / "together", name), tmp_path / f"{name}-j.pth"
        )
        alone = student_weights(root / name / name, tmp_path / f"{name}-a.pth")
        assert joint.keys() == alone.keys()
        assert all(torch.equal(joint[key], alone[key]) for key in joint), name
        joint_metrics = read_metrics(root / "together" / name)
        alone_metrics = read_metrics(root / name / name)
        for column in LOSS_COLUMNS:
            assert joint_metrics.column(column).to_pylist() == alone_metrics.column(column).to_pylist()
    narrow = student_weights(root / "together" / "narrow", tmp_path / "n.pth")
    wide = student_weights(root / "together" / "wide", tmp_path / "w.pth")
    assert narrow["cls_token"].shape[-1] == 64 and wide["cls_token"].shape[-1] == 128


def test_the_teacher_runs_once_per_batch_for_all_students(runs):
    _, _, forwards = runs
    assert forwards == {"together": STEPS, "narrow": STEPS, "wide": STEPS}


def test_shared_outputs_are_computed_once_per_batch_and_released_after_the_last_student():
    shared = SharedTeacherOutputs(students=2)
    computed = []
    first, second = torch.zeros(1), torch.zeros(1)
    values = [shared.get(first, lambda: computed.append("a") or "a") for _ in range(2)]
    assert values == ["a", "a"] and computed == ["a"] and shared._value is None
    assert shared.get(second, lambda: computed.append("b") or "b") == "b" and computed == ["a", "b"]


def test_models_trained_together_must_share_the_batch_stream(tmp_path):
    one = tiny_pretrain_config(train={"max_steps": 1})
    other = tiny_pretrain_config(train={"max_steps": 1, "seed": 1})
    with pytest.raises(ValueError, match="share one batch stream"):
        train_together([TrainedModel(one, tmp_path / "a"), TrainedModel(other, tmp_path / "b")], None)


def test_the_stage_exports_every_student_and_its_initial_weights(runs, pretrained, tmp_path):
    together, root, _ = runs
    images, _ = pretrained
    count = images.num_rows
    provenance = {
        "source": ["pool"] * count,
        "role": ["uncurated"] * count,
        "width": [28] * count,
        "height": [28] * count,
        "format": ["PNG"] * count,
        "mode": ["L"] * count,
        "num_frames": [1] * count,
        "seed_source": ["seed"] * count,
        "curation_mode": ["as_is"] * count,
        "query_image_id": pa.nulls(count, pa.string()),
        "similarity": pa.nulls(count, pa.float32()),
        "rank": pa.nulls(count, pa.int32()),
        "cluster": pa.nulls(count, pa.int32()),
    }
    curated = images.drop_columns(["label"])
    for name, column in provenance.items():
        curated = curated.append_column(name, pa.array(column) if isinstance(column, list) else column)
    inputs = {
        "curated": write_manifest(tmp_path, "curated", CURATED, curated),
        "exports": write_manifest(tmp_path, "exports", EXPORTS, EXPORTS.empty_table()),
    }
    run = run_stage(
        get_stage("distill"), together, inputs, store=Store(tmp_path / "store"), show_progress=False
    )
    exports = {row["model"]: row for row in read_exports(run.outputs["exports"])}
    assert list(exports) == [TEACHER_MODEL, "narrow", "narrow_random_init", "wide", "wide_random_init"]
    metrics = run.outputs["metrics"].read(DISTILL_METRICS)
    assert metrics.column("model").to_pylist() == ["narrow"] * STEPS + ["wide"] * STEPS
    for name in ("narrow", "wide"):
        exported = load_exported_backbone(exports[name]).state_dict()
        joint = student_weights(root / "together" / name, tmp_path / f"{name}.pth")
        assert all(torch.equal(exported[key], joint[key]) for key in joint), name
