"""Several students distilled in one run vs each in a run of its own: time, and the teacher's share.

    nice python -m benchmarks.multi_student [--steps 20] [--teacher vit_small]

A teacher pretrained for one step (an lvd checkpoint with heads; its weights do not change the cost)
and two students of the demo's size (vit_test, vit_demo) on Fashion-MNIST images, the demo's crops
(48 / 24 px, 8-px patches, 4 local crops, batch 32, 1,024 prototypes), CPU, fp32. Timed: the two
students in one `distill` run, and each student's own run (same steps, same batches). The teacher's
forward on one batch is timed apart, so the saving can be checked against what sharing it should save:
(students - 1) x steps x the teacher's forward.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from distillation.config import DistillConfig
from distillation.stage import distill
from distillation.teacher import load_checkpoint_teacher
from pipelines.config import build_config
from pipelines.datasets import write_fashion_mnist_pngs
from training.config import PretrainConfig
from training.data.dataset import make_train_loader
from training.trainer import CHECKPOINTS_DIR, train

DEFAULT_STEPS = 20
DEFAULT_TEACHER = "vit_small"
IMAGES = 256
PATCH = 8
HEADS = {"head_n_prototypes": 1024, "head_hidden_dim": 512, "head_bottleneck_dim": 128}
RECIPE: dict[str, Any] = {
    "dino": HEADS,
    "ibot": HEADS,
    "crops": {"global_crops_size": 48, "local_crops_size": 24, "local_crops_number": 4},
    "train": {"batch_size_per_gpu": 32, "num_workers": 0, "precision": "fp32", "device": "cpu"},
}
STUDENTS = (
    {"name": "vit_test", "student": {"arch": "vit_test", "patch_size": PATCH, "drop_path_rate": 0.0}},
    {"name": "vit_demo", "student": {"arch": "vit_demo", "patch_size": PATCH, "drop_path_rate": 0.0}},
)
TEACHER_FORWARD_REPEATS = 3


def pretrained_teacher(root: Path, images: pa.Table, arch: str) -> Path:
    recipe = {
        **RECIPE,
        "student": {"arch": arch, "patch_size": PATCH},
        "train": {**RECIPE["train"], "max_steps": 1},
    }
    train(build_config(PretrainConfig, recipe, "pretrain"), images, root / "teacher", show_progress=False)
    return root / "teacher" / CHECKPOINTS_DIR


def distill_config(teacher: Path, students: list[dict[str, Any]], steps: int) -> DistillConfig:
    recipe = {**RECIPE, "student": STUDENTS[0]["student"], "train": {**RECIPE["train"], "max_steps": steps}}
    data = {"teacher_source": str(teacher), "recipe": recipe, "students": students}
    return build_config(DistillConfig, data, "distill")


def teacher_forward_seconds(teacher: Path, images: pa.Table, cfg: DistillConfig) -> float:
    """The fastest of a few teacher forwards (backbone and heads) on one batch's global crops."""
    modules = load_checkpoint_teacher(teacher).modules
    batch = next(make_train_loader(images, cfg.recipe, rank=0, world_size=1, start_step=0, num_workers=0))
    crops = batch["collated_global_crops"]
    best = float("inf")
    with torch.no_grad():
        for _ in range(TEACHER_FORWARD_REPEATS):
            started = time.perf_counter()
            output = modules["backbone"](crops, is_training=True)
            modules["dino_head"](output["x_norm_clstoken"])
            modules["dino_head"](output["x_norm_patchtokens"].flatten(0, 1))
            best = min(best, time.perf_counter() - started)
    return best


def timed_distill(cfg: DistillConfig, images: pa.Table, out: Path) -> float:
    started = time.perf_counter()
    distill(cfg, images, out, show_progress=False)
    return time.perf_counter() - started


def measure(steps: int = DEFAULT_STEPS, teacher_arch: str = DEFAULT_TEACHER) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = write_fashion_mnist_pngs(root / "images", IMAGES)
        teacher = pretrained_teacher(root, images, teacher_arch)
        together = distill_config(teacher, list(STUDENTS), steps)
        alone = {student["name"]: distill_config(teacher, [student], steps) for student in STUDENTS}
        forward = teacher_forward_seconds(teacher, images, together)
        seconds_together = timed_distill(together, images, root / "together")
        seconds_alone = {name: timed_distill(cfg, images, root / name) for name, cfg in alone.items()}
    separate = sum(seconds_alone.values())
    return {
        "steps": steps,
        "teacher": teacher_arch,
        "students": [student["name"] for student in STUDENTS],
        "together_seconds": seconds_together,
        "alone_seconds": seconds_alone,
        "separate_seconds": separate,
        "ratio": seconds_together / separate,
        "teacher_forward_seconds": forward,
        "expected_saving_seconds": (len(STUDENTS) - 1) * steps * forward,
    }


def report(result: dict[str, Any]) -> None:
    alone = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result["alone_seconds"].items())
    print(
        f"{len(result['students'])} students ({', '.join(result['students'])}) from a {result['teacher']} "
        f"teacher, {result['steps']} steps, CPU fp32"
    )
    together, separate = result["together_seconds"], result["separate_seconds"]
    print(f"one run: {together:.1f} s; separate runs: {separate:.1f} s ({alone})")
    print(f"one run / separate runs = {result['ratio']:.2f}")
    forward = result["teacher_forward_seconds"]
    print(
        f"saved {separate - together:.1f} s; the teacher's forward is {forward:.2f} s a batch, so sharing it "
        f"should save {result['expected_saving_seconds']:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--teacher", default=DEFAULT_TEACHER)
    args = parser.parse_args()
    report(measure(args.steps, args.teacher))


if __name__ == "__main__":
    main()
