"""SSCD's loss: InfoNCE over views that share content, minus a differential-entropy (KoLeo) term.

    descriptors [m, d] (unit), sources [m, n] (how much of source image j view i shows; mix-ups show two)
      --match: share a source--> positives; every other view is a negative
      --InfoNCE: -log e^{s_ij/t} / (e^{s_ij/t} + sum over negatives k of e^{s_ik/t}), averaged per row
      --entropy: d_i = distance to the nearest negative; loss = InfoNCE - weight * mean log d_i

Other positives and the row itself are left out of each denominator, as in SSCD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Why a floor: two identical negatives would make log d infinite (SSCD clamps the squared distance).
MIN_SQUARED_DISTANCE = 1e-6


@dataclass(frozen=True, slots=True)
class CopyLoss:
    total: torch.Tensor
    infonce: torch.Tensor
    entropy: torch.Tensor  # mean log distance to the nearest negative (higher: more spread)
    positive_similarity: float  # mean cosine of positive pairs
    hardest_negative_similarity: float  # mean over rows of the highest negative cosine


def copy_loss(
    descriptors: torch.Tensor, sources: torch.Tensor, temperature: float, entropy_weight: float
) -> CopyLoss:
    """SSCD's training loss for unit `descriptors` [m, d] whose views show `sources` [m, n] (> 0)."""
    similarity = descriptors @ descriptors.T
    shares = sources > 0
    same = (shares.float() @ shares.float().T) > 0
    itself = torch.eye(len(descriptors), dtype=torch.bool, device=descriptors.device)
    positive = same & ~itself
    negative = ~same
    logits = similarity / temperature
    # log(e^{s_ij/t} + sum_k e^{s_ik/t}) for every pair: one logsumexp over negatives, then log-add-exp.
    negatives_lse = torch.logsumexp(logits.masked_fill(~negative, float("-inf")), dim=1, keepdim=True)
    log_p = logits - torch.logaddexp(logits, negatives_lse)
    per_row = -(log_p * positive).sum(dim=1) / positive.sum(dim=1).clamp(min=1)
    has_positive = positive.any(dim=1)
    infonce = per_row[has_positive].mean()
    hardest = similarity.masked_fill(~negative, float("-inf")).max(dim=1).values
    log_distance = 0.5 * torch.log((2 - 2 * hardest).clamp(min=MIN_SQUARED_DISTANCE))
    entropy = log_distance.mean()
    with torch.no_grad():
        positive_similarity = float(similarity[positive].mean()) if positive.any() else float("nan")
        hardest_negative = float(hardest.mean())
    return CopyLoss(
        total=infonce - entropy_weight * entropy,
        infonce=infonce,
        entropy=entropy,
        positive_similarity=positive_similarity,
        hardest_negative_similarity=hardest_negative,
    )
