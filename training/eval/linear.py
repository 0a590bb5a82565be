"""Linear probe on frozen features (recipe 8.2): the official grid of classifiers, at small scale.

    FeatureSet --probe_inputs--> (N, F) per feature set (CLS of the last 1 or 4 blocks, +/- patch mean)
    train rows --stratified_split(val_fraction, seed)--> fit rows | val rows
    fit rows --one shuffled batch stream; every (feature set, lr) Linear at once, CE summed--> trained grid
    val accuracy --best (feature set, lr)--> its accuracy on the test rows -> ProbeResult

Features are used raw (no standardisation), as the official code does. Shapes: N rows, F probe input
width, C classes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR

from training.eval.features import FeatureSet


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """One probe input: the CLS of the last `num_blocks` blocks, plus the mean patch token if `avgpool`."""

    num_blocks: int
    avgpool: bool


FEATURE_SETS: dict[str, FeatureSpec] = {
    "cls_last1": FeatureSpec(num_blocks=1, avgpool=False),
    "cls_last1+avgpool": FeatureSpec(num_blocks=1, avgpool=True),
    "cls_last4": FeatureSpec(num_blocks=4, avgpool=False),
    "cls_last4+avgpool": FeatureSpec(num_blocks=4, avgpool=True),
}
PROBE_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
LR_REFERENCE_BATCH = 256  # each grid lr is scaled by batch_size / 256 (one process)
MOMENTUM = 0.9
INIT_WEIGHT_STD = 0.01
DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 128  # the official per-GPU batch
DEFAULT_VAL_FRACTION = 0.1

GridKey = tuple[str, float]  # (feature set, grid lr before batch scaling)


@dataclass(frozen=True, slots=True)
class GridRow:
    feature_set: str
    lr: float
    val_accuracy: float
    test_accuracy: float


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The classifier chosen on val, its accuracies (fractions in [0, 1]) and the whole grid."""

    feature_set: str
    lr: float
    val_accuracy: float
    test_accuracy: float
    grid: tuple[GridRow, ...]


def probe_inputs(features: FeatureSet, feature_set: str) -> np.ndarray:
    """(N, F) input of one feature set: block CLS tokens oldest first, then the patch mean."""
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"unknown feature set {feature_set!r}; known: {', '.join(FEATURE_SETS)}")
    spec = FEATURE_SETS[feature_set]
    if spec.num_blocks > features.num_blocks:
        raise ValueError(
            f"{feature_set!r} needs the CLS of {spec.num_blocks} blocks but the features hold "
            f"{features.num_blocks}; extract with n_last_blocks={spec.num_blocks} or drop that feature set"
        )
    parts = [features.block_cls_NLD[:, -spec.num_blocks :].reshape(len(features), -1)]
    if spec.avgpool:
        if features.patch_mean_ND is None:
            raise ValueError(f"{feature_set!r} needs the patch mean, and these features have no patches")
        parts.append(features.patch_mean_ND)
    return np.concatenate(parts, axis=1)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (fit, val) row indices: a seeded random `val_fraction` of each class (halves round up)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    val_parts = []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        val_parts.append(rows[: math.floor(val_fraction * len(rows) + 0.5)])
    val_rows = np.sort(np.concatenate(val_parts))
    return np.setdiff1d(np.arange(len(labels)), val_rows), val_rows


def build_classifier_grid(
    input_dims: Mapping[str, int], lrs: Sequence[float], num_classes: int, seed: int
) -> dict[GridKey, nn.Linear]:
    """One Linear per (feature set, lr), weight ~ N(0, 0.01) and bias 0, in grid order."""
    generator = torch.Generator().manual_seed(seed)
    classifiers = {}
    for feature_set, dim in input_dims.items():
        for lr in lrs:
            layer = nn.Linear(dim, num_classes)
            with torch.no_grad():
                layer.weight.normal_(0.0, INIT_WEIGHT_STD, generator=generator)
                layer.bias.zero_()
            classifiers[feature_set, lr] = layer
    return classifiers


def train_classifier_grid(
    classifiers: Mapping[GridKey, nn.Linear],
    inputs: Mapping[str, torch.Tensor],
    labels_N: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
) -> None:
    """Train every classifier in place on the same shuffled batches.

    SGD (momentum 0.9, no weight decay) with lr * batch_size / 256 per classifier, cosine-annealed to 0
    over all iterations (stepped per batch); the loss is the sum of the classifiers' batch-mean CE, so
    each classifier sees exactly its own gradient. Epochs are passes over the rows, the last batch short.
    """
    groups = [
        {"params": list(layer.parameters()), "lr": lr * batch_size / LR_REFERENCE_BATCH}
        for (_, lr), layer in classifiers.items()
    ]
    optimizer = torch.optim.SGD(groups, momentum=MOMENTUM, weight_decay=0.0)
    num_rows = len(labels_N)
    scheduler = CosineAnnealingLR(optimizer, T_max=epochs * math.ceil(num_rows / batch_size), eta_min=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for cpu_rows in torch.randperm(num_rows, generator=generator).split(batch_size):
            rows = cpu_rows.to(labels_N.device)
            batch = {name: x_NF[rows] for name, x_NF in inputs.items()}
            batch_labels = labels_N[rows]
            loss = sum(
                F.cross_entropy(layer(batch[name]), batch_labels) for (name, _), layer in classifiers.items()
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()


def grid_accuracy(
    classifiers: Mapping[GridKey, nn.Linear], inputs: Mapping[str, torch.Tensor], labels_N: torch.Tensor
) -> dict[GridKey, float]:
    """Top-1 accuracy (fraction) of every classifier."""
    with torch.no_grad():
        return {
            (name, lr): (layer(inputs[name]).argmax(dim=1) == labels_N).float().mean().item()
            for (name, lr), layer in classifiers.items()
        }


def _probe_tensors(
    features: FeatureSet, rows: np.ndarray, feature_sets: Sequence[str], device: torch.device
) -> dict[str, torch.Tensor]:
    return {
        name: torch.as_tensor(probe_inputs(features, name)[rows], dtype=torch.float32, device=device)
        for name in feature_sets
    }


def _check_labels(features: FeatureSet, labels: np.ndarray, what: str) -> None:
    if labels.shape != (len(features),):
        raise ValueError(f"{what} labels shape {labels.shape} != ({len(features)},)")


def linear_probe(
    train: FeatureSet,
    train_labels: np.ndarray,
    test: FeatureSet,
    test_labels: np.ndarray,
    *,
    lrs: Sequence[float] = PROBE_LRS,
    feature_sets: Sequence[str] = tuple(FEATURE_SETS),
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> ProbeResult:
    """Train the (feature set x lr) grid, choose on a held-out part of train, report on test.

    The grid is trained on the train rows minus a stratified `val_fraction` (seeded); the classifier
    with the best val accuracy (ties: the earlier grid entry) is reported on `test` as trained, without
    refitting on all of train. Labels are integer classes 0..C-1.
    """
    _check_labels(train, train_labels, "train")
    _check_labels(test, test_labels, "test")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs ({epochs}) and batch_size ({batch_size}) must be >= 1")
    if not lrs or not feature_sets or len(set(lrs)) < len(lrs) or len(set(feature_sets)) < len(feature_sets):
        raise ValueError(f"need distinct, non-empty lrs and feature sets; got {lrs} and {feature_sets}")
    device = torch.device(device)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    fit_rows, val_rows = stratified_split(train_labels, val_fraction, seed)
    if not len(val_rows) or not len(fit_rows):
        raise ValueError(
            f"val_fraction {val_fraction} of {len(train_labels)} train rows leaves an empty fit or val part"
        )
    labels_N = torch.as_tensor(train_labels, dtype=torch.int64, device=device)
    fit_inputs = _probe_tensors(train, fit_rows, feature_sets, device)
    input_dims = {name: x_NF.shape[1] for name, x_NF in fit_inputs.items()}
    classifiers = build_classifier_grid(input_dims, lrs, num_classes, seed)
    for layer in classifiers.values():
        layer.to(device)
    train_classifier_grid(
        classifiers, fit_inputs, labels_N[fit_rows], epochs=epochs, batch_size=batch_size, seed=seed
    )
    val = grid_accuracy(
        classifiers, _probe_tensors(train, val_rows, feature_sets, device), labels_N[val_rows]
    )
    test_accuracy = grid_accuracy(
        classifiers,
        _probe_tensors(test, np.arange(len(test)), feature_sets, device),
        torch.as_tensor(test_labels, dtype=torch.int64, device=device),
    )
    grid = tuple(GridRow(name, lr, val[name, lr], test_accuracy[name, lr]) for name, lr in classifiers)
    best = max(grid, key=lambda row: row.val_accuracy)  # max keeps the first of equal rows
    return ProbeResult(best.feature_set, best.lr, best.val_accuracy, best.test_accuracy, grid)
