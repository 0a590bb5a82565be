"""Frozen-backbone features for evaluation: the eval transform and one batched extraction pass.

    PIL image --eval_transform--> (3, crop, crop) --batches--> backbone.get_intermediate_layers(n, norm=True)
      --> per block (patch tokens (B, P, D), CLS (B, D)) --> FeatureSet: CLS of the last n blocks + patch mean

The last block's CLS is the final-normed CLS, i.e. `backbone(x)`: the k-NN feature (recipe 8.1). The
linear probe (recipe 8.2) concatenates the CLS of the last 1 or 4 blocks and, optionally, the mean of
the last block's patch tokens. Shapes: N images, L blocks (oldest first), P patches, D width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms
from tqdm import tqdm

from pipelines.images import IMAGENET_MEAN, IMAGENET_STD

EVAL_RESIZE = 256  # shorter side before the centre crop (recipe 8.1)
EVAL_CROP = 224
# The official linear probe reads the CLS of the last 4 blocks (recipe 8.2).
LINEAR_PROBE_BLOCKS = 4

ImageTransform = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True, slots=True)
class FeatureSet:
    """Features of N images, float32.

    Attributes:
        block_cls_NLD: final-normed CLS token of each of the last L blocks, oldest block first.
        patch_mean_ND: mean of the last block's final-normed patch tokens (registers excluded); None for
            features without patches (the raw-pixel baseline).
    """

    block_cls_NLD: np.ndarray
    patch_mean_ND: np.ndarray | None

    def __post_init__(self) -> None:
        if self.block_cls_NLD.ndim != 3:
            raise ValueError(f"expected block_cls (N, L, D), got shape {self.block_cls_NLD.shape}")
        num, _, dim = self.block_cls_NLD.shape
        if self.patch_mean_ND is not None and self.patch_mean_ND.shape != (num, dim):
            raise ValueError(f"patch_mean shape {self.patch_mean_ND.shape} != {(num, dim)}")

    def __len__(self) -> int:
        return self.block_cls_NLD.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.block_cls_NLD.shape[1]

    @property
    def cls_ND(self) -> np.ndarray:
        """The last block's normed CLS, which is `backbone(x)`: the k-NN feature."""
        return self.block_cls_NLD[:, -1]

    @property
    def has_patches(self) -> bool:
        return self.patch_mean_ND is not None

    def subset(self, indices: np.ndarray) -> FeatureSet:
        patches = None if self.patch_mean_ND is None else self.patch_mean_ND[indices]
        return FeatureSet(self.block_cls_NLD[indices], patches)


def eval_transform(
    resize: int = EVAL_RESIZE,
    crop: int = EVAL_CROP,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> ImageTransform:
    """Resize the shorter side (bicubic), centre-crop a square, scale to [0, 1], normalise per channel."""
    return transforms.Compose(
        [
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(crop),
            transforms.ToTensor(),
            transforms.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def _batches(images: Iterable[Image.Image], size: int) -> Iterator[list[Image.Image]]:
    iterator = iter(images)
    while batch := list(islice(iterator, size)):
        yield batch


def extract_features(
    backbone: nn.Module,
    images: Iterable[Image.Image],
    *,
    batch_size: int,
    n_last_blocks: int = LINEAR_PROBE_BLOCKS,
    device: str | torch.device = "cpu",
    transform: ImageTransform | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    description: str = "features",
    num_images: int | None = None,
) -> FeatureSet:
    """Features of every image from one pass of the frozen `backbone` (in eval mode, no autograd).

    Args:
        backbone: a ViT with `get_intermediate_layers(x, n, return_class_token=True, norm=True)`.
        images: RGB images, read once in order.
        n_last_blocks: how many final blocks' CLS tokens to keep (at most the backbone's depth).
        transform: image -> normalised tensor; `eval_transform()` when None.
        autocast_dtype: run the backbone under autocast in this dtype (the official eval uses fp16 on
            GPU); features are returned as float32 either way.
        progress: show a tqdm bar over batches.
        description: the bar's label, e.g. "teacher train".
        num_images: how many `images` there are, for the bar's total (iterators have no length).
    """
    if batch_size < 1 or n_last_blocks < 1:
        raise ValueError(f"batch_size ({batch_size}) and n_last_blocks ({n_last_blocks}) must be >= 1")
    transform = transform or eval_transform()
    device = torch.device(device)
    backbone.eval().to(device)
    block_cls, patch_mean = [], []
    with torch.inference_mode():
        total = None if num_images is None else math.ceil(num_images / batch_size)
        batches = tqdm(
            _batches(images, batch_size), desc=description, total=total, unit="batch", disable=not progress
        )
        for batch in batches:
            images_BCHW = torch.stack([transform(image) for image in batch]).to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                outputs = backbone.get_intermediate_layers(
                    images_BCHW, n_last_blocks, return_class_token=True, norm=True
                )
            block_cls.append(torch.stack([cls_BD for _, cls_BD in outputs], dim=1).float().cpu())
            patch_mean.append(outputs[-1][0].float().mean(dim=1).cpu())
    if not block_cls:
        raise ValueError("no images to extract features from")
    return FeatureSet(torch.cat(block_cls).numpy(), torch.cat(patch_mean).numpy())


def raw_pixel_features(
    images: Iterable[Image.Image],
    *,
    transform: ImageTransform,
    progress: bool = False,
    description: str = "raw pixels",
    num_images: int | None = None,
) -> FeatureSet:
    """The baseline every learned feature must beat: each image exactly as a backbone would receive it
    (`transform`: resize, crop, normalisation), flattened into one vector. One "block", no patches."""
    images = tqdm(images, desc=description, total=num_images, unit="image", disable=not progress)
    pixels = [transform(image).flatten().numpy() for image in images]
    if not pixels:
        raise ValueError("no images to extract features from")
    return FeatureSet(np.stack(pixels)[:, None, :], None)
