"""The DINOv2 losses and teacher targets (recipe sections 4.3-4.5); see README.md for the data flow."""

from training.losses.centering import LaggedCenter, sinkhorn_knopp, softmax_center
from training.losses.dino import dino_loss
from training.losses.ibot import ibot_loss, masks_weight_for
from training.losses.koleo import koleo_loss

__all__ = [
    "LaggedCenter",
    "dino_loss",
    "ibot_loss",
    "koleo_loss",
    "masks_weight_for",
    "sinkhorn_knopp",
    "softmax_center",
]
