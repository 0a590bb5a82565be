"""Multi-head self-attention with the official DINOv2 parameter layout (one qkv Linear, one proj Linear).

Crop groups of different sizes travel packed: every group (b_i, n_i, D) is flattened and concatenated
into one (T, D) tensor with T = sum(b_i * n_i), so token-wise layers run once for all groups.

    groups [(b_i, n_i, D)] --pack_groups--> (T, D) --qkv--> per image attention --proj--> (T, D)
      --unpack_groups--> groups [(b_i, n_i, D)]

Attention stays per image: on CUDA with xFormers installed, one memory-efficient call with a
block-diagonal mask over the packed sequence; elsewhere, SDPA once per group.

Shapes: B batch, N tokens, D width, H heads, K = D / H head width, T packed tokens, C = 3 * D.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_ENV = "LVD_ATTENTION"
ATTENTION_CHOICES = ("auto", "sdpa", "xformers")
QKV = 3  # the qkv projection stacks queries, keys and values, in that order
MASK_CACHE_SIZE = 64  # distinct group layouts whose block-diagonal masks are kept

GroupShapes = tuple[tuple[int, int], ...]  # (images, tokens per image) of each crop group


def pack_groups(groups: list[torch.Tensor]) -> tuple[torch.Tensor, GroupShapes]:
    """[(b_i, n_i, D)] -> (T, D) and the group shapes that undo it."""
    shapes = tuple((group.shape[0], group.shape[1]) for group in groups)
    return torch.cat([group.flatten(0, 1) for group in groups]), shapes


def unpack_groups(x_TD: torch.Tensor, shapes: GroupShapes) -> list[torch.Tensor]:
    """(T, D) -> [(b_i, n_i, D)], the inverse of `pack_groups`."""
    chunks = x_TD.split([batch * tokens for batch, tokens in shapes])
    return [chunk.view(batch, tokens, -1) for chunk, (batch, tokens) in zip(chunks, shapes, strict=True)]


def packed_sequence_lengths(shapes: GroupShapes) -> list[int]:
    """One segment per image: n_i repeated b_i times, group after group (the block-diagonal layout)."""
    return [tokens for batch, tokens in shapes for _ in range(batch)]


@functools.cache
def xformers_ops() -> ModuleType | None:
    """`xformers.ops` for packed CUDA attention, or None: not installed, or `LVD_ATTENTION=sdpa`.

    `LVD_ATTENTION` (auto | sdpa | xformers) picks the kernel, e.g. to compare them on one GPU; auto and
    xformers use xFormers when it imports, and xformers insists on it.
    """
    choice = os.environ.get(ATTENTION_ENV, "auto")
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"{ATTENTION_ENV}={choice!r}; expected one of {', '.join(ATTENTION_CHOICES)}")
    if choice == "sdpa":
        return None
    try:
        from xformers import ops
    except ImportError:
        if choice == "xformers":
            raise
        return None
    return ops


@functools.lru_cache(maxsize=MASK_CACHE_SIZE)
def block_diagonal_mask(shapes: GroupShapes) -> object:
    """The xFormers mask that lets each image of the packed sequence attend only to itself."""
    return xformers_ops().fmha.BlockDiagonalMask.from_seqlens(packed_sequence_lengths(shapes))


class Attention(nn.Module):
    """Softmax attention through `scaled_dot_product_attention` (its default scale is K ** -0.5)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * QKV, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        return self.proj(self._attend(self.qkv(x_BND)))

    def forward_packed(self, x_TD: torch.Tensor, shapes: GroupShapes) -> torch.Tensor:
        """Attention within each image of a packed sequence (see `pack_groups`); (T, D) -> (T, D)."""
        qkv_TC = self.qkv(x_TD)
        ops = xformers_ops() if qkv_TC.is_cuda else None
        if ops is not None:
            out_TD = self._attend_block_diagonal(qkv_TC, shapes, ops)
        else:
            chunks = qkv_TC.split([batch * tokens for batch, tokens in shapes])
            out_TD = torch.cat(
                [
                    self._attend(chunk.view(batch, tokens, -1)).flatten(0, 1)
                    for chunk, (batch, tokens) in zip(chunks, shapes, strict=True)
                ]
            )
        return self.proj(out_TD)

    def _attend(self, qkv_BNC: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = qkv_BNC.shape
        qkv = qkv_BNC.reshape(batch, tokens, QKV, self.num_heads, width // (QKV * self.num_heads))
        q_BHNK, k_BHNK, v_BHNK = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out_BHNK = F.scaled_dot_product_attention(q_BHNK, k_BHNK, v_BHNK)
        return out_BHNK.transpose(1, 2).reshape(batch, tokens, width // QKV)

    def _attend_block_diagonal(
        self, qkv_TC: torch.Tensor, shapes: GroupShapes, ops: ModuleType
    ) -> torch.Tensor:
        total, width = qkv_TC.shape
        # xFormers takes (batch, tokens, heads, K); the packed sequence is one batch entry.
        qkv = qkv_TC.reshape(1, total, QKV, self.num_heads, width // (QKV * self.num_heads))
        q, k, v = qkv.unbind(2)
        out = ops.memory_efficient_attention(q, k, v, attn_bias=block_diagonal_mask(shapes))
        return out.reshape(total, width // QKV)
