"""The layers inside a ViT block besides attention: the feed-forward choices and LayerScale.

ffn_layer name (the official config's) --make_ffn--> Mlp (GELU, 4x wide) | SwiGLUFFN (fused, ~8/3x wide)
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

SWIGLU_MULTIPLE = 8  # SwiGLU hidden width is rounded up to a multiple of this
MLP_RATIO = 4

# The official config's ffn_layer names; both SwiGLU names build the same fused layer here.
FfnLayer = Literal["mlp", "swiglu", "swiglufused"]
FFN_LAYERS: tuple[str, ...] = get_args(FfnLayer)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """out = w3(SiLU(x1) * x2) where [x1, x2] = w12(x) split in halves (the official fused layout)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


def swiglu_hidden(dim: int) -> int:
    width = int(MLP_RATIO * dim * 2 / 3)
    return (width + SWIGLU_MULTIPLE - 1) // SWIGLU_MULTIPLE * SWIGLU_MULTIPLE


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def make_ffn(ffn_layer: FfnLayer, dim: int) -> nn.Module:
    """The feed-forward layer of a block: GELU MLP (4x wide) or the fused SwiGLU (~8/3x wide)."""
    if ffn_layer == "mlp":
        return Mlp(dim, MLP_RATIO * dim)
    return SwiGLUFFN(dim, swiglu_hidden(dim))


def check_ffn_layer(ffn_layer: str | None) -> None:
    """Raises ValueError unless `ffn_layer` is None (the arch's own) or one of FFN_LAYERS."""
    if ffn_layer is not None and ffn_layer not in FFN_LAYERS:
        raise ValueError(f"ffn_layer must be one of {', '.join(FFN_LAYERS)}, got {ffn_layer!r}")
