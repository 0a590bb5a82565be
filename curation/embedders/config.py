"""`EmbedderConfig`: which model maps an image to one vector, and its preprocessing.

Validated once when built: the generic fields here, then the kind's own checks (`registry.check_config`,
which imports that kind's module: a `vit` config is checked against the registered architectures).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from curation.embedders.registry import check_config
from pipelines.images import IMAGENET_MEAN, IMAGENET_STD
from pipelines.validation import require

ResizeMode = Literal["short_side", "square"]
Device = Literal["cpu", "cuda"]
RGB_CHANNELS = 3
DEFAULT_WEIGHTS_CACHE = "~/.cache/lvd/weights"


@dataclass(frozen=True, kw_only=True, slots=True)
class EmbedderConfig:
    """A model that maps an image to one L2-normalised vector, with its preprocessing."""

    kind: str = "efficientnet_lite0"
    """Any registered kind (`curation.embedders.embedder_kinds()`): torchscript, efficientnet_lite0, vit."""
    path: str | None = None
    """Weights file: required for `torchscript` (e.g. an SSCD .torchscript.pt file) and `vit` (an official
    DINOv2 hub backbone such as dinov2_vitl14_pretrain.pth, an lvd export, a teacher checkpoint, a timm
    DINOv2 checkpoint or a transformers DINOv2 directory), unless `weights` names published ones."""
    weights: str | None = None
    """Published weights by name instead of `path` (`curation.embedders.official`): dinov2_vit{s,b,l,g}14
    and their `_reg4` variants, sscd_disc_mixup, sscd_disc_large, ... Downloaded once into
    `weights_cache`; sets `kind` and the backbone options (fields left at their defaults take them)."""
    weights_cache: str = DEFAULT_WEIGHTS_CACHE
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
        if self.weights is not None:
            self._take_official_options()
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

    def _take_official_options(self) -> None:
        """The named weights' kind and options, in the fields still at their defaults (frozen dataclass:
        set once here, while the config is being built); a field set otherwise is an error."""
        from curation.embedders.official import official_weights

        official = official_weights(self.weights)
        require(self.path is None, f"set either path or weights ({self.weights}), not both")
        defaults = {item.name: item.default for item in fields(self)}
        for name, value in {"kind": official.kind, **official.options}.items():
            current = getattr(self, name)
            require(
                current in (value, defaults[name]),
                f"weights {self.weights} need {name} {value!r}, not {current!r}: leave {name} unset",
            )
            object.__setattr__(self, name, value)
