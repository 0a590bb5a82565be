"""The copy descriptor network, SSCD's shape: trunk feature map -> GeM pooling -> linear -> L2 norm.

    [n, 3, S, S] --trunk (frozen prefix, trainable tail)--> [n, C, h, w] --GeM p=3--> [n, C]
      --linear--> [n, dim] --L2--> unit descriptors

Trunks are registered by name (`TRUNKS`); each loads its own offline weights and says how many of its
last blocks may train. The trained network is exported by tracing (`export_torchscript`): the file is
all a user needs, like SSCD's own `.torchscript.pt` files.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from curation.embedders.config import EmbedderConfig
from curation.embedders.efficientnet import load_efficientnet_lite0
from curation.embedders.registry import weights_fingerprint
from pipelines.validation import require

# SSCD's GeM: p fixed at 3 (a learned p diverged), activations clamped before the power.
GEM_EPS = 1e-6


class GeM(nn.Module):
    """Generalised-mean pooling over space: (mean x^p)^(1/p); p=1 is average, p->inf max pooling."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.clamp(min=GEM_EPS).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class EfficientNetTrunk(nn.Module):
    """EfficientNet-Lite0's feature map, its first blocks frozen (inference mode, no gradients).

    Why freeze a prefix: on a CPU the early, high-resolution blocks cost most of the backward pass, and
    their ImageNet filters (edges, textures) are what a copy detector needs too.
    """

    def __init__(self, trainable_blocks: int):
        super().__init__()
        network = load_efficientnet_lite0()
        blocks = list(network._blocks)
        require(
            0 <= trainable_blocks <= len(blocks),
            f"trainable_blocks must be in [0, {len(blocks)}] for efficientnet_lite0, got {trainable_blocks}",
        )
        split = len(blocks) - trainable_blocks
        self.frozen = nn.Sequential(network._conv_stem, network._bn0, network._swish, *blocks[:split])
        self.tail = nn.Sequential(*blocks[split:], network._conv_head, network._bn1, network._swish)
        self.frozen.requires_grad_(False)
        self.channels = network._conv_head.out_channels

    def train(self, mode: bool = True) -> EfficientNetTrunk:
        super().train(mode)
        self.frozen.eval()  # its batch-norm statistics stay ImageNet's
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.frozen(images)
        return self.tail(features)


@dataclass(frozen=True, slots=True)
class RegisteredTrunk:
    build: Callable[[int], nn.Module]  # trainable_blocks -> a module with `.channels`
    weights_kind: str  # the embedder kind whose weights file it starts from (it keys the stage)


TRUNKS: dict[str, RegisteredTrunk] = {
    "efficientnet_lite0": RegisteredTrunk(EfficientNetTrunk, weights_kind="efficientnet_lite0"),
}


def check_trunk(trunk: str) -> None:
    require(trunk in TRUNKS, f"unknown trunk {trunk!r}; registered: {', '.join(sorted(TRUNKS))}")


def trunk_fingerprint(trunk: str) -> str:
    """sha256 of the trunk's starting weights."""
    return weights_fingerprint(EmbedderConfig(kind=TRUNKS[trunk].weights_kind))


class CopyDescriptorNet(nn.Module):
    """Images [n, 3, S, S] (ImageNet mean/std) -> unit copy descriptors [n, dim]."""

    def __init__(self, trunk: nn.Module, dim: int, gem_p: float):
        super().__init__()
        self.trunk = trunk
        self.pool = GeM(gem_p)
        self.projection = nn.Linear(trunk.channels, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.projection(self.pool(self.trunk(images))), dim=1)


def build_descriptor_net(trunk: str, trainable_blocks: int, dim: int, gem_p: float) -> CopyDescriptorNet:
    check_trunk(trunk)
    return CopyDescriptorNet(TRUNKS[trunk].build(trainable_blocks), dim, gem_p)


def weights_sha256(net: nn.Module) -> str:
    """sha256 of every parameter and buffer (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def export_torchscript(net: CopyDescriptorNet, image_size: int, path: Path) -> Path:
    """Traces `net` (inference mode, on CPU) into a TorchScript file that loads without lvd."""
    net = net.eval().cpu()
    example = torch.zeros(1, 3, image_size, image_size)
    with warnings.catch_warnings(), torch.no_grad():
        # Why: torch marks TorchScript deprecated, but it is the format SSCD's weights ship in.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(net, example)
        temp = path.with_name(f"{path.name}.tmp")
        torch.jit.save(traced, str(temp))
    temp.replace(path)
    return path
