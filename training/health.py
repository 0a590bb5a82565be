"""Training health: the collapse signals logged every step, and the stop on a non-finite loss.

    teacher targets (2, B, K) --teacher_entropy (mean row entropy / log K), prototype_usage-->
    student global CLS (2B, D) --cls_std (spread across the batch), cls_rank (effective rank)-->
    the step's metrics row (TRAIN_METRICS), health.png in the report

    the step's loss terms and gradient norms --check_finite--> TrainingDiverged naming the term and
    its likely cause (the most common complaint about DINOv2 on custom data: NaN, KoLeo -> inf, collapse)

Reading the signals: a collapsed run has teacher_entropy near 1 (uniform targets) or prototype_usage
near 0 (every image on the same prototypes), and cls_std / cls_rank falling towards 0 / 1 (every image
on the same feature). Healthy runs keep cls_std near 1 and cls_rank well above 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

HEALTH_COLUMNS = ("teacher_entropy", "prototype_usage", "cls_std", "cls_rank")
# Why: 0 * log 0 is taken as 0; probabilities below this add nothing measurable to an entropy.
PROBABILITY_FLOOR = 1e-12
# Why: identical unit features, centred, leave float32 rounding (~1e-7 per row), not a direction.
SPREAD_FLOOR_PER_ROW = 1e-5

DINO_OVERFLOW = (
    "the DINO head's logits overflowed: learning rate too high for this batch size, or too short a "
    "warm-up; lower optim.base_lr or raise optim.warmup_epochs"
)
# The likely cause of each term going non-finite, in the order the objective computes them.
DIVERGENCE_CAUSES = {
    "dino_local_crops_loss": DINO_OVERFLOW,
    "dino_global_crops_loss": DINO_OVERFLOW,
    "koleo_loss": "KoLeo is -log of the distance to each CLS feature's nearest neighbour in the batch, "
    "infinite when two coincide: exact duplicate images in one batch (run exact_dedup on the pool) or "
    "a collapsed backbone (see cls_std)",
    "ibot_loss": "the iBOT head's logits overflowed on the masked patches: learning rate too high, or "
    "block masks that cover whole crops; lower optim.base_lr or ibot.mask_ratio_min_max",
    "objective": "the terms' weighted sum overflowed: a loss weight too large",
}
GRADIENT_CAUSE = (
    "the gradient overflowed in backward: learning rate too high, or fp16 without loss scaling; "
    "lower optim.base_lr, or train in bf16 / fp32"
)


class TrainingDiverged(FloatingPointError):
    """A loss term or a gradient norm went NaN or infinite; the message names which and why."""


@torch.no_grad()
def prototype_signals(target_probs: torch.Tensor) -> dict[str, float]:
    """teacher_entropy: mean entropy of the targets' rows over log K (1: uniform, i.e. collapsed to no
    information; 0: one-hot). prototype_usage: distinct argmax prototypes over the most there could be,
    min(K, rows) (near 0: every image on the same few prototypes)."""
    probs = target_probs.reshape(-1, target_probs.shape[-1]).float()
    rows, prototypes = probs.shape
    entropy = -(probs * probs.clamp_min(PROBABILITY_FLOOR).log()).sum(dim=1).mean()
    in_use = probs.argmax(dim=1).unique().numel()
    return {
        "teacher_entropy": float(entropy) / math.log(prototypes),
        "prototype_usage": in_use / min(prototypes, rows),
    }


@torch.no_grad()
def feature_signals(cls_features: torch.Tensor) -> dict[str, float]:
    """cls_std: the std across the batch of the L2-normalised CLS features, averaged over dimensions and
    scaled by sqrt(D), so features spread evenly over the sphere give about 1 and a collapse 0.
    cls_rank: the effective rank (exp of the entropy of the normalised singular values; Roy & Vetterli
    2007) of the centred batch, between 1 and min(rows, D)."""
    features = F.normalize(cls_features.detach().float(), dim=-1)
    rows, dim = features.shape
    std = features.std(dim=0).mean() * math.sqrt(dim) if rows > 1 else features.new_zeros(())
    singular = torch.linalg.svdvals(features - features.mean(dim=0))
    total = singular.sum()
    if rows < 2 or total <= SPREAD_FLOOR_PER_ROW * rows:
        return {"cls_std": float(std), "cls_rank": 1.0}
    shares = singular / total
    rank = torch.exp(-(shares * shares.clamp_min(PROBABILITY_FLOOR).log()).sum())
    return {"cls_std": float(std), "cls_rank": float(rank)}


def check_finite(step: int, losses: Mapping[str, float], grad_norms: Mapping[str, float]) -> None:
    """Stops a run at its first non-finite loss term (in computation order) or gradient norm.

    Raises:
        TrainingDiverged: naming the term, every other non-finite value, and the likely cause.
    """
    bad_terms = [name for name in DIVERGENCE_CAUSES if name in losses and not math.isfinite(losses[name])]
    bad_grads = [name for name, norm in grad_norms.items() if not math.isfinite(norm)]
    if not bad_terms and not bad_grads:
        return
    if bad_terms:
        first = bad_terms[0]
        cause = DIVERGENCE_CAUSES[first]
        what = f"{first} is {losses[first]}"
    else:
        first = bad_grads[0]
        cause = GRADIENT_CAUSE
        what = f"the gradient norm of the student's {first} is {grad_norms[first]}"
    others = [name for name in bad_terms if name != first] + [f"grad_norm_{name}" for name in bad_grads]
    also = f" (also non-finite: {', '.join(others)})" if others else ""
    raise TrainingDiverged(f"training diverged at step {step}: {what}{also}. Likely cause: {cause}.")
