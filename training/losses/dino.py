"""The DINO image-level loss (recipe 4.3): cross-entropy of student crops against teacher targets.

    student logits [s_1 .. s_S] (b, K each)   teacher probabilities [t_1 .. t_T] (b, K each)
      -> sum over every (s, t) pair of mean_b CE(s, t),  CE(s, t) = -sum_k t_k log_softmax(s / T_s)_k

The caller picks the pairs and the normaliser: 8 locals x 2 teacher views, plus the global students
against the view-swapped teachers, all divided by 18 (the meta-architecture's job, not this one's).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from training.losses.cross_entropy import soft_cross_entropy

STUDENT_TEMP = 0.1


def dino_loss(
    student_logits: Sequence[torch.Tensor],
    teacher_probs: Sequence[torch.Tensor],
    student_temp: float = STUDENT_TEMP,
) -> torch.Tensor:
    """Sum over all (student, teacher) pairs of the batch-mean cross-entropy.

    Args:
        student_logits: S tensors (b, K); fp16/bf16 allowed (the cross-entropy runs in fp32).
        teacher_probs: T tensors (b, K), row i the target for row i of every student tensor; usually fp32,
            which makes the products (and the loss) fp32.
        student_temp: T_s.

    Returns:
        A scalar: sum_s sum_t mean_b CE(s, t).
    """
    if not student_logits or not teacher_probs:
        raise ValueError("dino_loss needs at least one student and one teacher tensor")
    # sum_t mean_b CE(s, t) = mean_b CE(s, sum_t t): one (b, K) product per student instead of one per pair
    teacher_sum_BK = teacher_probs[0]
    for probs_BK in teacher_probs[1:]:
        teacher_sum_BK = teacher_sum_BK + probs_BK
    return sum(
        soft_cross_entropy(logits_BK, teacher_sum_BK, student_temp).mean() for logits_BK in student_logits
    )
