"""The iBOT masked-patch loss (recipe 4.3) and the per-token weights that turn it into per-image means.

    masks (n_images, N) bool --masks_weight_for--> w (n_m,): 1 / masked tokens of the token's image
    student patch logits (n_m, K), teacher probs (n_m, K), w
      -> -(1 / n_images) sum_t w_t sum_k P[t, k] log_softmax(s[t] / T_s)_k        (fp32)
       = (1 / n_images) sum over masked images of the mean CE over that image's masked tokens

n_images counts every global crop of the rank (2B), masked or not. Tokens are in the image-major,
row-major order of `masks.flatten()`, the order the masked positions are gathered in.
"""

from __future__ import annotations

import torch

from training.losses.cross_entropy import soft_cross_entropy

STUDENT_TEMP = 0.1


def masks_weight_for(masks_BN: torch.Tensor) -> torch.Tensor:
    """Per masked token, 1 / (masked tokens in its image), the count clamped to >= 1; shape (n_m,), fp32."""
    masked_per_image_B = masks_BN.sum(dim=-1).clamp(min=1).float()
    weight_BN = (1.0 / masked_per_image_B).unsqueeze(-1).expand_as(masks_BN)
    return weight_BN[masks_BN]


def ibot_loss(
    student_patch_logits: torch.Tensor,
    teacher_patch_probs: torch.Tensor,
    masks_weight: torch.Tensor,
    n_images: int,
    student_temp: float = STUDENT_TEMP,
) -> torch.Tensor:
    """Weighted cross-entropy over the masked tokens, divided by the number of images.

    Args:
        student_patch_logits: (n_m, K) student logits of the masked tokens (any float dtype).
        teacher_patch_probs: (n_m, K) teacher targets of the same tokens.
        masks_weight: (n_m,) from `masks_weight_for`.
        n_images: the denominator, every global crop of this rank (masked or not).
        student_temp: T_s.

    Returns:
        An fp32 scalar; 0 when no token is masked.
    """
    token_terms_M = soft_cross_entropy(student_patch_logits, teacher_patch_probs, student_temp)
    return (token_terms_M * masks_weight.float()).sum() / n_images
