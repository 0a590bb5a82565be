"""Typed configuration of distillation (the `distill` stage): teacher, objective, the student's recipe.

Defaults are the paper's distillation recipe (Table 17): a ViT-S/14 student of a ViT-g/14 teacher.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal

from pipelines.validation import require
from training.config import (
    CropsConfig,
    DinoConfig,
    IbotConfig,
    OptimConfig,
    PretrainConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)
from training.stages import TEACHER_MODEL

DistillObjective = Literal["auto", "heads", "features"]
# The paper's distillation row of Table 17: lr 1e-3 at batch 2048 under the sqrt rule is base_lr 7.07e-4
# for 1024; 625k iterations (500 epochs) with 100k warmup (80 epochs), no stochastic depth.
PAPER_DISTILL_BASE_LR = 1e-3 / (2048 / 1024) ** 0.5


def _paper_distill_recipe() -> PretrainConfig:
    return PretrainConfig(
        student=StudentConfig(arch="vit_small", patch_size=14, drop_path_rate=0.0),
        dino=DinoConfig(head_n_prototypes=131072, head_bottleneck_dim=384),
        ibot=IbotConfig(separate_head=True, head_n_prototypes=131072, head_bottleneck_dim=256),
        teacher=TeacherConfig(momentum_teacher=0.994),
        optim=OptimConfig(
            epochs=500,
            warmup_epochs=80,
            base_lr=PAPER_DISTILL_BASE_LR,
            weight_decay_end=0.2,
            layerwise_decay=1.0,
        ),
        crops=CropsConfig(local_crops_size=98),
        train=TrainConfig(batch_size_per_gpu=32, centering="sinkhorn_knopp"),
    )


def _paper_teacher_arch() -> StudentConfig:
    return StudentConfig(arch="vit_giant2", patch_size=14, ffn_layer="swiglufused", drop_path_rate=0.0)


# Names a student's exports and run folder take: letters, digits, `_` and `-`.
STUDENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
RANDOM_INIT_SUFFIX = "_random_init"
SINGLE_STUDENT = "student"


@dataclass(frozen=True, kw_only=True, slots=True)
class DistilledStudent:
    """One student of a multi-student run: its name (its exports' model name) and backbone."""

    name: str
    student: StudentConfig

    def __post_init__(self) -> None:
        require(
            bool(STUDENT_NAME.match(self.name)) and not self.name.endswith(RANDOM_INIT_SUFFIX),
            f"student name {self.name!r} must be letters, digits, _ or - and not end in {RANDOM_INIT_SUFFIX}",
        )
        require(self.name != TEACHER_MODEL, f"a student cannot be named {TEACHER_MODEL!r}")
        require(
            self.student.drop_path_rate == 0,
            f"{self.name}: drop_path_rate must be 0: distillation removes stochastic depth",
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class DistillConfig:
    """Distillation of a smaller student from a frozen teacher (recipe section 7; the `distill` stage).

    `recipe` is the training loop's config for the student: the same loop as pretraining, with the
    student's exponential moving average (momentum from `recipe.teacher`) as the final model. The
    student is never masked and has no stochastic depth.
    """

    teacher_source: str = ""
    """Empty: the `pretrain` stage's checkpoint (backbone + heads). Otherwise a checkpoint folder of an
    lvd run, or a backbone `.pth` in the official DINOv2 hub format (then `teacher_arch` describes it)."""
    teacher_arch: StudentConfig = field(default_factory=_paper_teacher_arch)
    """Backbone options of a hub-format teacher file (an lvd checkpoint records its own)."""
    objective: DistillObjective = "auto"
    """heads: DINO + iBOT (+ KoLeo) against the frozen teacher heads' targets (the paper's method);
    features: cosine matching of the teacher's normed CLS and patch features through a linear map;
    auto: heads when the teacher has heads (an lvd checkpoint), features for a bare hub backbone, whose
    freshly initialised heads would turn its features into targets through random prototypes."""
    recipe: PretrainConfig = field(default_factory=_paper_distill_recipe)
    students: tuple[DistilledStudent, ...] = ()
    """Several students distilled together (DINOv3's family in one run): each is `recipe` with its own
    backbone, and one teacher forward per batch feeds them all. Empty: one student, `recipe.student`."""

    def __post_init__(self) -> None:
        require(
            self.recipe.student.drop_path_rate == 0,
            "recipe.student.drop_path_rate must be 0: distillation removes stochastic depth",
        )
        names = [entry.name for entry in self.students]
        require(len(set(names)) == len(names), f"student names must be unique, got {names}")

    def student_recipes(self) -> dict[str, PretrainConfig]:
        """Student name -> its training recipe, in the order listed."""
        if not self.students:
            return {SINGLE_STUDENT: self.recipe}
        return {
            entry.name: dataclasses.replace(self.recipe, student=entry.student) for entry in self.students
        }
