"""Typed configuration of evaluation (the `evaluate` stage and the data ablation): k-NN and linear probe.

Defaults are the official protocol (recipe section 8): k in {10, 20, 100, 200}, T = 0.07, the probe's lr grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipelines.validation import require

EvalDatasetKind = Literal["fashion_mnist", "folder"]
# The official linear-probe learning-rate grid (recipe 8.2).
OFFICIAL_PROBE_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalDatasetConfig:
    """Labelled images for k-NN and linear evaluation: the Fashion-MNIST Debian package, or folders of
    class subfolders (ImageNet layout: <root>/<class>/<image>)."""

    kind: EvalDatasetKind = "fashion_mnist"
    train_path: str = ""
    """folder kind: the training images' root (the fashion_mnist kind reads the Debian package)."""
    test_path: str = ""
    train_limit: int = 0
    """Use a class-balanced subset of this many training images (0: all)."""
    test_limit: int = 0

    def __post_init__(self) -> None:
        if self.kind == "folder":
            require(bool(self.train_path and self.test_path), "folder datasets need train_path and test_path")
        require(self.train_limit >= 0 and self.test_limit >= 0, "train_limit and test_limit must be >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class EvaluateConfig:
    """k-NN and linear probe on frozen features of every exported backbone (recipe section 8)."""

    dataset: EvalDatasetConfig = field(default_factory=EvalDatasetConfig)
    resize_size: int = 256
    crop_size: int = 224
    batch_size: int = 256
    knn_ks: tuple[int, ...] = (10, 20, 100, 200)
    knn_temperature: float = 0.07
    linear_probe: bool = True
    linear_lrs: tuple[float, ...] = OFFICIAL_PROBE_LRS
    linear_epochs: int = 10
    linear_batch_size: int = 128
    val_fraction: float = 0.1
    """Share of the training features held out to choose the probe's feature set and lr."""
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.crop_size <= self.resize_size, "crop_size must be <= resize_size")
        require(len(self.knn_ks) > 0 and min(self.knn_ks) >= 1, "knn_ks must be positive integers")
        require(self.knn_temperature > 0, "knn_temperature must be > 0")
        require(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        require(self.linear_epochs >= 1 and self.batch_size >= 1, "epochs and batch sizes must be >= 1")
