"""Teacher targets: softmax-centering with a lagged centre, and Sinkhorn-Knopp (recipe 4.4, 4.5).

    teacher logits (b, K) --softmax((logits - c) / T_t)--> probabilities     c: LaggedCenter, fp32
                          --update(logits)--> batch statistic, all-reduced asynchronously,
                                              folded into c at the start of the next step
    teacher logits (b, K) --sinkhorn_knopp--> probabilities (rows sum to 1, prototypes ~uniform)

Every sum here is fp32 and, when torch.distributed is initialised, global over the ranks.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

CENTER_MOMENTUM = 0.9
SINKHORN_ITERATIONS = 3

CenterKind = Literal["rows", "rank_mean"]
# The official buffer shapes (dino_loss.center, ibot_patch_loss.center), kept so checkpoints line up.
CENTER_LEADING_DIMS: dict[str, tuple[int, ...]] = {"rows": (1,), "rank_mean": (1, 1)}


def distributed_world_size() -> int:
    """Number of ranks in the default process group, 1 when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks in place (a no-op on one process); returns it for chaining."""
    if distributed_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def softmax_center(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """softmax((logits - center) / T_t) over the last axis, in fp32.

    Args:
        teacher_logits: (..., K) in any float dtype.
        center: the K per-prototype values, in any shape with K elements ((1, K), (1, 1, K), (K,)).
        teacher_temp: T_t.

    Returns:
        fp32 probabilities with the shape of `teacher_logits`.
    """
    center_K = center.reshape(teacher_logits.shape[-1]).float()
    return F.softmax((teacher_logits.float() - center_K) / teacher_temp, dim=-1)


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor,
    teacher_temp: float,
    n_iterations: int = SINKHORN_ITERATIONS,
    total_count: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets over the global batch (recipe 4.5), fp32, no max-subtraction.

    Q (K, b) = exp(logits / T_t)^T is normalised to total mass 1, then `n_iterations` times each
    prototype row is scaled to mass 1/K (row sums all-reduced) and each sample column to mass 1/B_tot;
    finally Q * B_tot is returned transposed, so every sample row sums to 1.

    Args:
        teacher_logits: (b, K) logits of this rank's samples.
        teacher_temp: T_t.
        n_iterations: alternating normalisation rounds.
        total_count: B_tot, the global number of samples; default b * world_size. The iBOT variant
            passes the all-reduced number of masked tokens, since ranks hold different counts.

    Returns:
        (b, K) fp32 probabilities.
    """
    num_prototypes = teacher_logits.shape[-1]
    if total_count is None:
        total_count = teacher_logits.shape[0] * distributed_world_size()
    q_KB = (teacher_logits.float() / teacher_temp).exp_().t()
    q_KB /= all_reduce_sum_(q_KB.sum())
    # Each normalisation divides by its sums and its constant (K, then B_tot) in one pass over Q.
    for _ in range(n_iterations):
        q_KB /= all_reduce_sum_(q_KB.sum(dim=1, keepdim=True)) * num_prototypes
        q_KB /= q_KB.sum(dim=0, keepdim=True) * total_count  # a column is one sample, whole on this rank
    q_KB *= total_count
    return q_KB.t()


class LaggedCenter(nn.Module):
    """The softmax-centering centre c (fp32 buffer `center`), updated one step late.

    Step t: `probabilities(logits_t, T)` first folds in the statistic recorded by `update(logits_{t-1})`
    (c <- m c + (1 - m) batch_mean), then centres with it; `update(logits_t)` records this step's
    statistic and starts its all-reduce, which the next step waits on. So the centre used at step t holds
    teacher outputs of steps < t only, and the reduction overlaps the student's forward and backward.

    Batch statistic, by `kind`:
        "rows": the global row mean = all-reduced row sum / (rows * W) (DINO CLS logits, (1, K) centre;
            every rank holds the same 2B rows);
        "rank_mean": the mean of per-rank row means = all-reduced local mean / W (iBOT masked tokens,
            (1, 1, K) centre), not weighted by each rank's token count.
    A rank with no rows contributes a zero statistic, so the all-reduce still matches across ranks and
    the centre stays finite (the official code would average an empty tensor into NaN).
    """

    def __init__(self, num_prototypes: int, kind: CenterKind, momentum: float = CENTER_MOMENTUM):
        super().__init__()
        if kind not in CENTER_LEADING_DIMS:
            raise ValueError(f"kind must be one of {sorted(CENTER_LEADING_DIMS)}, got {kind!r}")
        self.kind = kind
        self.momentum = momentum
        shape = (*CENTER_LEADING_DIMS[kind], num_prototypes)
        self.register_buffer("center", torch.zeros(shape, dtype=torch.float32))
        self._pending_K: torch.Tensor | None = None
        self._pending_divisor = 1
        self._pending_work: Any = None
        self.register_state_dict_pre_hook(_flush_before_save)
        self.register_load_state_dict_pre_hook(_discard_pending_before_load)

    def probabilities(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Fold in the pending update, then return softmax_center(teacher_logits, center, T) (fp32)."""
        self.flush()
        return softmax_center(teacher_logits, self.center, teacher_temp)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """Record this step's batch statistic of `teacher_logits` (..., K); applied at the next step."""
        self.flush()  # never lose an update that no `probabilities` call has folded in yet
        rows_NK = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float()
        world_size = distributed_world_size()
        local_sum_K = rows_NK.sum(dim=0)  # zeros on a rank without rows
        num_rows = max(rows_NK.shape[0], 1)
        if self.kind == "rows":
            self._pending_K = local_sum_K
            self._pending_divisor = num_rows * world_size
        else:
            self._pending_K = local_sum_K / num_rows
            self._pending_divisor = world_size
        if world_size > 1:
            self._pending_work = dist.all_reduce(self._pending_K, op=dist.ReduceOp.SUM, async_op=True)

    @torch.no_grad()
    def flush(self) -> None:
        """Fold the pending update into `center` now (the trainer calls this before checkpointing)."""
        if self._pending_K is None:
            return
        if self._pending_work is not None:
            self._pending_work.wait()
        batch_mean_K = self._pending_K / self._pending_divisor
        # copy_ keeps the registered buffer object, which wrappers and state dicts hold on to
        self.center.copy_(self.center * self.momentum + batch_mean_K * (1 - self.momentum))
        self.discard_pending()

    def discard_pending(self) -> None:
        """Forget the recorded statistic (after waiting for its all-reduce, so no collective dangles)."""
        if self._pending_work is not None:
            self._pending_work.wait()
        self._pending_K = None
        self._pending_work = None
        self._pending_divisor = 1


# The centre is read only after the pending update is folded in, so folding it in before a save changes
# no result and the saved centre is complete; a loaded centre supersedes whatever was pending.
def _flush_before_save(module: LaggedCenter, prefix: str, keep_vars: bool) -> None:
    module.flush()


def _discard_pending_before_load(module: LaggedCenter, *hook_args: Any) -> None:
    module.discard_pending()
