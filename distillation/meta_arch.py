"""Distillation meta-architecture: a smaller student trained against a frozen teacher (recipe section 7).

    global crops --frozen teacher backbone (+ heads)--> targets
    [global crops, local crops] (never masked) --student--> DINO over the 18 crop pairs + iBOT on every
      patch token of the two global crops + KoLeo      (objective "heads", the paper's method)
                                                  or: cosine matching of CLS and patch features
                                                      through linear maps   (objective "features")
    after each step: student_ema <- m * student_ema + (1 - m) * student; student_ema is the final model

The paper's changes to the pretraining loop: a frozen teacher, a spare EMA of the student as the result,
no masking and no stochastic depth, and iBOT on the two global crops. For iBOT this follows the DINOv2
maintainers' "all the tokens" (issue #176) rather than DINOv3's sampled positions: with no mask there
is no reason to score a subset.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from distillation.config import DistillConfig
from distillation.teacher import FrozenTeacher
from training.checkpoint import backbone_options
from training.health import feature_signals
from training.losses import koleo_loss
from training.ssl import LOGGED_HALVED, NUM_GLOBAL_CROPS, SSLMetaArch, build_backbone, build_heads, ema_update

Objective = Literal["heads", "features"]
FEATURE_HEAD = "feature_head"


class FeatureProjection(nn.Module):
    """Linear maps from the student's width to the teacher's, one for CLS and one for patch tokens."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.cls_proj = nn.Linear(student_dim, teacher_dim)
        self.patch_proj = nn.Linear(student_dim, teacher_dim)

    def forward(
        self, cls_BD: torch.Tensor, patches_BPD: torch.Tensor, local_cls_BD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # One call for all three: under FSDP2 a module's weights are gathered around its forward only.
        return self.cls_proj(cls_BD), self.patch_proj(patches_BPD), self.cls_proj(local_cls_BD)


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos) over rows, in fp32."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def check_compatible(cfg: DistillConfig, teacher: FrozenTeacher, objective: Objective) -> None:
    """A student that cannot learn from this teacher is a config error, said before any training."""
    recipe = cfg.recipe
    if teacher.options["patch_size"] != recipe.student.patch_size:
        raise ValueError(
            f"teacher patch size {teacher.options['patch_size']} != student {recipe.student.patch_size}: "
            "patch-level targets need the same token grid"
        )
    if objective == "features":
        return
    if teacher.head_config is None or "dino_head" not in teacher.modules:
        raise ValueError(f"objective 'heads' needs a teacher with heads; {teacher.source} has none")
    own, theirs = recipe, teacher.head_config
    if (own.dino.head_n_prototypes, own.ibot.head_n_prototypes, own.ibot.separate_head) != (
        theirs.dino.head_n_prototypes,
        theirs.ibot.head_n_prototypes,
        theirs.ibot.separate_head,
    ):
        raise ValueError(
            "the student's heads must score the teacher's prototypes: set distill.recipe.dino/ibot "
            f"head_n_prototypes to {theirs.dino.head_n_prototypes}/{theirs.ibot.head_n_prototypes} "
            f"and ibot.separate_head to {theirs.ibot.separate_head}"
        )


class SharedTeacherOutputs:
    """The frozen teacher's outputs for the current batch, shared by the students trained together on it:
    the first student to ask computes them, the others reuse them, and the last one lets them go (they
    are large: logits over every prototype for every patch)."""

    def __init__(self, students: int):
        self.students = students
        self._key: object | None = None
        self._value: Any = None
        self._served = 0

    def get(self, key: object, compute: Callable[[], Any]) -> Any:
        """The outputs for the batch `key` (the batch's own tensor: identity, not equality)."""
        if key is not self._key:
            self._key, self._value, self._served = key, compute(), 0
        value = self._value
        self._served += 1
        if self._served == self.students:
            self._value = None  # every student has its reference; the key stays to catch a repeat
        return value


class DistillMetaArch(SSLMetaArch):
    """Student, frozen teacher, the student's EMA, and the distillation objective.

    With `shared`, the teacher's outputs come from it: several students trained together on one batch
    stream pay for one teacher forward per batch (each still normalises the targets itself, so its
    centring state is exactly that of a run of its own).
    """

    def __init__(
        self,
        cfg: DistillConfig,
        teacher: FrozenTeacher,
        objective: Objective,
        shared: SharedTeacherOutputs | None = None,
    ):
        check_compatible(cfg, teacher, objective)
        recipe = cfg.recipe
        backbone = build_backbone(recipe, drop_path_rate=0.0)
        if objective == "heads":
            heads = build_heads(recipe, backbone.embed_dim)
        else:
            heads = {
                FEATURE_HEAD: FeatureProjection(backbone.embed_dim, teacher.modules["backbone"].embed_dim)
            }
        backbone.mask_token.requires_grad_(False)  # the student is never masked: nothing trains it
        student = nn.ModuleDict({"backbone": backbone, **heads})
        super().__init__(recipe, (student, teacher.modules))
        self.objective = objective
        self.student_ema = copy.deepcopy(student).requires_grad_(False)
        self.shared = shared
        # The batch being trained on (its global crops as the loader gave them): the key of `shared`.
        # Not the device copy, which is a new tensor for every student on CUDA.
        self._batch_key: torch.Tensor | None = None

    def train(self, mode: bool = True) -> DistillMetaArch:
        super().train(mode)
        self.student_ema.eval()
        return self

    def ibot_positions(
        self, batch: Mapping[str, torch.Tensor], device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """No mask for the student; iBOT scores every patch of the global crops, each image's mean."""
        tokens = batch["collated_masks"].numel()
        per_image = batch["collated_masks"].shape[1]
        return (
            None,
            torch.arange(tokens, device=device),
            torch.full((tokens,), 1.0 / per_image, device=device),
        )

    def forward_backward(
        self,
        batch: Mapping[str, torch.Tensor],
        teacher_temp: float,
        backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    ) -> dict[str, float]:
        self._batch_key = batch["collated_global_crops"]
        if self.objective == "heads":
            return super().forward_backward(batch, teacher_temp, backward)
        terms, global_cls = self.feature_terms(batch)
        backward(terms["objective"])
        # No prototypes in this objective: the teacher-side signals stay empty in the metrics.
        return {
            **{name: float(value.detach()) for name, value in terms.items()},
            **feature_signals(global_cls),
        }

    def feature_terms(
        self, batch: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Cosine distances to the teacher's normed features, under the metrics' column names: global CLS
        (same view) -> dino_global, local CLS vs both global views -> dino_local, patches -> ibot; and
        the student's global CLS (for the health signals)."""
        device = next(self.student.parameters()).device
        global_crops = batch["collated_global_crops"].to(device, non_blocking=True)
        local_crops = batch["collated_local_crops"].to(device, non_blocking=True)
        target = self.shared_teacher_output(lambda: self.teacher_features(global_crops))
        groups = [global_crops, local_crops] if local_crops.shape[0] else [global_crops]
        outputs = self.student["backbone"](groups, masks=[None] * len(groups), is_training=True)
        global_cls = outputs[0]["x_norm_clstoken"]
        local_cls = outputs[1]["x_norm_clstoken"] if len(outputs) > 1 else global_cls[:0]
        cls, patches, local = self.student[FEATURE_HEAD](
            global_cls, outputs[0]["x_norm_patchtokens"], local_cls
        )
        cls_term = cosine_distance(cls, target["x_norm_clstoken"])
        patch_term = cosine_distance(patches, target["x_norm_patchtokens"])
        local_term = cls_term.new_zeros(())
        if local.shape[0]:
            local = local.unflatten(0, (-1, global_cls.shape[0] // NUM_GLOBAL_CROPS))  # (n_local, B, D)
            views = target["x_norm_clstoken"].chunk(NUM_GLOBAL_CROPS)
            local_term = torch.stack([cosine_distance(local, view.expand_as(local)) for view in views]).mean()
        koleo = self.cfg.dino.koleo_loss_weight * sum(
            koleo_loss(v) for v in global_cls.chunk(NUM_GLOBAL_CROPS)
        )
        terms = {
            "dino_local_crops_loss": local_term,
            "dino_global_crops_loss": cls_term,
            "koleo_loss": koleo * LOGGED_HALVED,
            "ibot_loss": patch_term,
            "objective": cls_term + local_term + patch_term + koleo,
        }
        return terms, global_cls

    def shared_teacher_output(self, compute: Callable[[], Any]) -> Any:
        return compute() if self.shared is None else self.shared.get(self._batch_key, compute)

    @torch.no_grad()
    def teacher_features(self, global_crops: torch.Tensor) -> dict[str, torch.Tensor]:
        target = self.teacher["backbone"](global_crops, is_training=True)
        if hasattr(self.teacher["backbone"], "reshard"):
            self.teacher["backbone"].reshard()
        return target

    def teacher_logits(
        self, global_crops: torch.Tensor, mask_indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        compute = super().teacher_logits
        return self.shared_teacher_output(lambda: compute(global_crops, mask_indices))

    # -- training-loop interface ------------------------------------------------------------------------

    def shard_groups(self) -> list[nn.ModuleDict]:
        return [self.student, self.student_ema, self.teacher]

    def exportable_backbones(self) -> dict[str, dict[str, Any]]:
        """The student's EMA is the distilled model (the first entry: the default export)."""
        options = backbone_options(self.cfg.student, self.cfg.crops.global_crops_size)
        return {"student_ema": options, "student": options}

    def update_ema(self, momentum: float) -> None:
        ema_update(self.student_ema, self.student, momentum)
