"""`EmbedderConfig`: which model maps an image to one vector, and its preprocessing.

Validated once when built: the generic fields here, then the kind's own checks (`registry.check_config`,
which imports that kind's module: a `vit` config is checked against the registered architectures).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from curation.embedders.registry import check_config
from pipelines.images import IMAGENET_MEAN, IMAGENET_STD
from pipelines.validation import require

ResizeMode = Literal["short_side", "square"]
Device = Literal["cpu", "cuda"]
RGB_CHANNELS = 3


@dataclass(frozen=True, kw_only=True, slots=True)
class EmbedderConfig:
    """A model that maps an image to one L2-normalised vector, with its preprocessing."""

    kind: str = "efficientnet_lite0"
    """Any registered kind (`curation.embedders.embedder_kinds()`): torchscript, efficientnet_lite0, vit."""
    path: str | None = None
    """Weights file: required for `torchscript` (e.g. an SSCD .torchscript.pt file) and `vit` (an official
    DINOv2 hub backbone such as dinov2_vitl14_pretrain.pth, an lvd export, or a teacher checkpoint)."""
    resize: ResizeMode = "square"
    """`square`: resize to image_size x image_size (batches well). `short_side`: keep the aspect ratio;
    torchscript resizes the shorter side to image_size, one image per batch (SSCD's paper protocol, 288);
    efficientnet_lite0 and vit resize it to image_size * 256 / 224 and centre-crop image_size."""
    image_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    batch_size: int = 32
    device: Device = "cpu"
    arch: str = "vit_small"
    """`vit` only: the backbone (one of `training.models.vit.ARCHS`); must match the weights file."""
    patch_size: int = 14
    """`vit` only. The image grid (img_size) is read from the file's pos_embed."""
    num_register_tokens: int = 0
    """`vit` only: 4 for the hub's `_reg4` files."""
    ffn_layer: str | None = None
    """`vit` only (one of `training.models.vit.FFN_LAYERS`): unset takes the arch's own (SwiGLU for
    vit_giant2, MLP otherwise)."""
    interpolate_offset: float = 0.1
    """`vit` only: 0.0 for the hub's `_reg4` files."""
    interpolate_antialias: bool = False
    """`vit` only: True for the hub's `_reg4` files."""

    def __post_init__(self) -> None:
        require(self.patch_size >= 1, f"patch_size must be >= 1, got {self.patch_size}")
        require(
            self.num_register_tokens >= 0, f"num_register_tokens must be >= 0, got {self.num_register_tokens}"
        )
        require(self.image_size >= 1, f"image_size must be >= 1, got {self.image_size}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(
            len(self.mean) == len(self.std) == RGB_CHANNELS,
            f"mean and std must have {RGB_CHANNELS} values (RGB)",
        )
        check_config(self)
