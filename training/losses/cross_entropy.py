"""Cross-entropy against soft targets, per row, with a hand-written backward (the DINO and iBOT core).

    logits s (M, K), targets t (M, K), temperature T
      forward:  z = s / T,  lse = logsumexp(z),  CE = sum_k t_k (lse - z_k) = lse * sum_k t_k - <t, z>
      backward: dCE/ds = (softmax(z) * sum_k t_k - t) / T

Autograd through `-(t * log_softmax(s / T)).sum(-1)` writes six (M, K) tensors per call: the division,
the log-softmax and the product forward; their three gradients backward. With K = 65,536 prototypes and
hundreds of masked tokens those are the largest elementwise passes of a training step, and on CPU each
fresh (M, K) buffer also costs its page faults. Here the forward writes no (M, K) tensor (fp32 logits):
the log-sum-exp runs over blocks of rows small enough to reuse freed memory, and <t, z> is a batched
product. The backward writes one, the gradient, in place. Everything runs in fp32 whatever the logits'
dtype (the gradient comes back in it).
"""

from __future__ import annotations

import torch

# Elements of one block of the log-sum-exp: 8 MiB of fp32, under glibc's mmap threshold (32 MiB at most),
# so each block's temporaries reuse freed heap memory instead of faulting in fresh pages.
BLOCK_ELEMENTS = 1 << 21


class _SoftTargetCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        block_rows = max(1, BLOCK_ELEMENTS // logits.shape[-1])
        lse_M = torch.cat(
            [torch.logsumexp(block.float() / temperature, dim=-1) for block in logits.split(block_rows)]
        )
        targets_MK = targets.float()
        target_mass_M = targets_MK.sum(dim=-1)
        # <t, s> per row as a batched (1 x K) @ (K x 1) product: no (M, K) temporary.
        dot_M = torch.bmm(targets_MK.unsqueeze(1), logits.float().unsqueeze(2)).reshape(-1)
        ctx.save_for_backward(logits, lse_M, targets_MK, target_mass_M)
        ctx.temperature = temperature
        return lse_M * target_mass_M - dot_M / temperature

    @staticmethod
    def backward(ctx, grad_M: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, lse_M, targets_MK, target_mass_M = ctx.saved_tensors
        scale_M1 = (grad_M / ctx.temperature).unsqueeze(-1)
        grad_MK = (logits.float() / ctx.temperature).sub_(lse_M.unsqueeze(-1)).exp_()  # softmax(z)
        grad_MK.mul_(target_mass_M.unsqueeze(-1) * scale_M1).addcmul_(targets_MK, scale_M1, value=-1.0)
        return grad_MK.to(logits.dtype), None, None


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per row, -sum_k targets_k log_softmax(logits / temperature)_k, in fp32; shape (M,).

    Args:
        logits: (M, K), any float dtype; gradients flow to it.
        targets: (M, K) target weights (no gradient); rows need not sum to 1 (a sum of several views).
        temperature: the student temperature T_s.
    """
    if logits.shape != targets.shape or logits.dim() != 2:
        shapes = f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)}"
        raise ValueError(f"{shapes}: both must be the same (M, K)")
    return _SoftTargetCrossEntropy.apply(logits, targets.detach(), temperature)
