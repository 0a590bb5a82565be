"""The DINO / iBOT projection head, with the official state-dict keys (`mlp.*`, `last_layer.weight_g|v`).

    features (..., D) -> mlp: Linear -> GELU -> [Linear -> GELU] x (nlayers - 2) -> Linear
      -> bottleneck (..., bottleneck_dim) -> L2-normalise -> weight-normed Linear, no bias -> logits (..., K)

Each logit is the cosine between the bottleneck and a prototype row, times that row's trainable g.
Shapes: D input width, K prototypes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.02  # truncated-normal std of the MLP Linear weights
LINEAR_DEFAULT_INIT_SLOPE = math.sqrt(5)  # nn.Linear's kaiming-uniform init, kept for the prototypes
FP16_NORM_EPS = 1e-6  # 1e-12 underflows to zero in fp16
NORM_EPS = 1e-12


class WeightNormLinear(nn.Module):
    """y = x @ W.T with W = g * v / ||v|| per output row; no bias.

    Parameters are `weight_g` (K, 1) and `weight_v` (K, in), the keys of the old `weight_norm` hook. W is
    computed from them in every forward, so the module also works when FSDP2 shards both as DTensors.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_v, a=LINEAR_DEFAULT_INIT_SLOPE)

    def weight(self) -> torch.Tensor:
        row_norms = torch.linalg.vector_norm(self.weight_v, dim=1, keepdim=True)
        return self.weight_v * (self.weight_g / row_norms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())


def build_mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int) -> nn.Module:
    """One Linear in_dim -> bottleneck for nlayers 1; else Linear/GELU pairs (indices 0, 2, 4, ...)."""
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normed prototypes (recipe section 2.10)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
    ):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        self.mlp = build_mlp(in_dim, hidden_dim, bottleneck_dim, nlayers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                nn.init.zeros_(module.bias)
        # Built after the MLP init, as in the official head, so the random draws come in the same order.
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bottleneck = self.mlp(x)
        eps = FP16_NORM_EPS if bottleneck.dtype == torch.float16 else NORM_EPS
        return self.last_layer(F.normalize(bottleneck, dim=-1, eps=eps))
