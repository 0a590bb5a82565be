"""Multi-head self-attention with the official DINOv2 parameter layout (one qkv Linear, one proj Linear).

Shapes: B batch, N tokens, D width, H heads, K = D / H head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QKV = 3  # the qkv projection stacks queries, keys and values, in that order


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
        batch, tokens, dim = x_BND.shape
        qkv = self.qkv(x_BND).reshape(batch, tokens, QKV, self.num_heads, dim // self.num_heads)
        q_BHNK, k_BHNK, v_BHNK = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out_BHNK = F.scaled_dot_product_attention(q_BHNK, k_BHNK, v_BHNK)
        return self.proj(out_BHNK.transpose(1, 2).reshape(batch, tokens, dim))
