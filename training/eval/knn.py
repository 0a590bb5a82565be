"""Weighted k-NN classification on frozen features (recipe 8.1).

    train (N, D), test (M, D) --L2-normalise--> cosine similarity (M, N) --top max_k--> sims, labels
      --softmax(sims / T) over the max_k--> weights --for each k: sum the first k weight * one_hot--> argmax

The test set is processed in chunks of `chunk_size` rows, so memory stays O(chunk_size * (N + C)). Weights are
normalised over the max_k neighbours for every k, as the official code does; a common factor per test
row, it changes no argmax. Shapes: N train rows, M test rows, D width, K neighbours, C classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

KNN_KS = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07
DEFAULT_CHUNK_SIZE = 256  # test rows per similarity matrix: 256 x 1.28M train rows is 1.3 GB


def _normalised(features: np.ndarray, device: torch.device) -> torch.Tensor:
    return F.normalize(torch.as_tensor(features, dtype=torch.float32, device=device), dim=1)


def _check_inputs(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray) -> None:
    if (
        train_features.ndim != 2
        or test_features.ndim != 2
        or train_features.shape[1] != test_features.shape[1]
    ):
        raise ValueError(
            f"expected train (N, D) and test (M, D) features, got {train_features.shape} and "
            f"{test_features.shape}"
        )
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"train_labels shape {train_labels.shape} != ({train_features.shape[0]},)")
    if len(train_labels) == 0:
        raise ValueError("k-NN needs at least one train row")


def knn_classify(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    *,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    num_classes: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    device: str | torch.device = "cpu",
) -> dict[int, np.ndarray]:
    """Predicted class of every test row for each k in `ks`.

    Args:
        train_labels: integer classes in [0, num_classes).
        ks: neighbour counts; a k above the number of train rows uses all of them.
        num_classes: defaults to max(train_labels) + 1.

    Returns:
        {k: (M,) int64 predictions} for each requested k.
    """
    _check_inputs(train_features, train_labels, test_features)
    if not ks or min(ks) < 1 or chunk_size < 1 or temperature <= 0:
        raise ValueError(
            f"need ks >= 1, chunk_size >= 1, temperature > 0; got {ks}, {chunk_size}, {temperature}"
        )
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    if train_labels.min() < 0 or train_labels.max() >= num_classes:
        raise ValueError(
            f"train labels must lie in [0, {num_classes}); got [{train_labels.min()}, {train_labels.max()}]"
        )
    device = torch.device(device)
    train_ND = _normalised(train_features, device)
    labels_N = torch.as_tensor(train_labels, dtype=torch.int64, device=device)
    max_k = min(max(ks), len(train_labels))
    predictions: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, len(test_features), chunk_size):
        test_MD = _normalised(test_features[start : start + chunk_size], device)
        sims_MK, neighbours_MK = (test_MD @ train_ND.T).topk(max_k, dim=1)
        weights_MK = (sims_MK / temperature).softmax(dim=1)
        neighbour_labels_MK = labels_N[neighbours_MK]
        for k in ks:
            k_used = min(k, max_k)
            # Why scatter_add and not a (M, K, C) one-hot: it keeps memory at O(M * C) for 1000 classes.
            scores_MC = torch.zeros(len(test_MD), num_classes, device=device).scatter_add_(
                1, neighbour_labels_MK[:, :k_used], weights_MK[:, :k_used]
            )
            predictions[k].append(scores_MC.argmax(dim=1).cpu())
    empty = torch.zeros(0, dtype=torch.int64)
    return {k: torch.cat([empty, *chunks]).numpy() for k, chunks in predictions.items()}


def knn_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    num_classes: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    device: str | torch.device = "cpu",
) -> dict[int, float]:
    """Top-1 accuracy (a fraction in [0, 1]) for each k; the options are those of `knn_classify`."""
    if test_labels.shape != (test_features.shape[0],):
        raise ValueError(f"test_labels shape {test_labels.shape} != ({test_features.shape[0]},)")
    predictions = knn_classify(
        train_features,
        train_labels,
        test_features,
        ks=ks,
        temperature=temperature,
        num_classes=num_classes,
        chunk_size=chunk_size,
        device=device,
    )
    return {k: float(np.mean(predicted == test_labels)) for k, predicted in predictions.items()}
