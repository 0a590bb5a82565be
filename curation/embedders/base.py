"""What every embedder is: a preprocessing transform, a feature function, and L2 normalisation.

    PIL RGB image --preprocess--> tensor [3, H, W] --stack--> batch --features--> [n, dim] --L2--> float32

An embedder kind (one module each, see registry.py) only says how to load its model, which tensor its
features are, and how it resizes; batching, inference mode, devices and normalisation live here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from curation.embedders.config import EmbedderConfig

# Why: clamping the norm keeps an all-zero feature (a blank image through ReLU) finite instead of NaN.
MIN_NORM = 1e-12

Transform = Callable[[Image.Image], torch.Tensor]
FeatureFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True)
class Embedder:
    """A loaded model that maps images to L2-normalised float32 vectors of width `dim`.

    Attributes:
        dim: Width of the vectors.
        batch_size: Images per forward pass; 1 when preprocessing keeps each image's aspect ratio.
        device: Where the model runs (`cpu` or `cuda`).
        transform: Preprocessing of one upright RGB image into a normalised [3, H, W] tensor.
        features: The model's feature function, from a batch [n, 3, H, W] to [n, dim].
    """

    dim: int
    batch_size: int
    device: str
    transform: Transform
    features: FeatureFn

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """Unit-length float32 vectors [n, dim] for a preprocessed batch [n, 3, H, W]."""
        with torch.inference_mode():
            output = self.features(batch.to(self.device)).float()
            output = torch.nn.functional.normalize(output, dim=1, eps=MIN_NORM)
        return output.cpu().numpy()

    def embed_images(self, images: Iterable[Image.Image]) -> np.ndarray:
        """Vectors [n, dim] for `images`, preprocessed and run `batch_size` at a time."""
        chunks = [
            self.embed(torch.stack([self.preprocess(image) for image in batch]))
            for batch in _batches(images, self.batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), dtype=np.float32)


def _batches(items: Iterable[Image.Image], size: int) -> Iterator[list[Image.Image]]:
    batch: list[Image.Image] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def normalise(mean: Sequence[float], std: Sequence[float]) -> list:
    """To a float tensor in [0, 1], then per-channel standardisation."""
    return [transforms.ToTensor(), transforms.Normalize(mean=list(mean), std=list(std))]


def square_transform(cfg: EmbedderConfig) -> Transform:
    """Resize to image_size x image_size (aspect ratio not kept), so any images batch together."""
    size = (cfg.image_size, cfg.image_size)
    return transforms.Compose([transforms.Resize(size), *normalise(cfg.mean, cfg.std)])


def short_side_transform(cfg: EmbedderConfig, crop: int | None = None) -> Transform:
    """Resize the shorter side to image_size keeping the aspect ratio; centre-crop to `crop` if given."""
    steps = [transforms.Resize(cfg.image_size)]
    if crop is not None:
        steps.append(transforms.CenterCrop(crop))
    return transforms.Compose([*steps, *normalise(cfg.mean, cfg.std)])


def probe_dim(features: FeatureFn, image_size: int, device: str) -> int:
    """Width of a feature function's output, from one forward pass on a blank image."""
    with torch.inference_mode():
        output = features(torch.zeros(1, 3, image_size, image_size, device=device))
    if output.ndim != 2 or output.shape[0] != 1:
        raise ValueError(f"an embedder must return [batch, dim] features, got shape {tuple(output.shape)}")
    return int(output.shape[1])
