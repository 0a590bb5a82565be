"""The KoLeo regulariser (recipe 4.3): spread features by pushing each from its nearest neighbour.

    x (B, D) --fp32, z = x / max(||x||, eps)--> nn(i) = argmax_{j != i} <z_i, z_j>
      --> -mean_i log(||z_i - z_nn(i) + eps|| + eps)

Applied per view and per rank to the normed student CLS tokens (no all-gather). Unlike the official fp16
computation, where eps underflows to 0 and two identical rows give an infinite loss, this always runs in
fp32, so duplicates give a large but finite value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KOLEO_EPS = 1e-8
SELF_SIMILARITY = -1.0  # below any cosine between two other rows, so a row is never its own neighbour


def koleo_loss(x_BD: torch.Tensor, eps: float = KOLEO_EPS) -> torch.Tensor:
    """-mean_i log(||z_i - z_nn(i) + eps|| + eps) over the rows of `x_BD`; an fp32 scalar.

    Gradients flow through both z_i and z_nn(i); the neighbour choice itself is not differentiated.
    A single row is its own neighbour and gives -log(eps sqrt(D) + eps).
    """
    z_BD = F.normalize(x_BD.float(), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        cosine_BB = z_BD @ z_BD.t()
        cosine_BB.fill_diagonal_(SELF_SIMILARITY)
        neighbour_B = cosine_BB.max(dim=1).indices
    distance_B = torch.linalg.vector_norm(z_BD - z_BD[neighbour_B] + eps, dim=-1)
    return -torch.log(distance_B + eps).mean()
