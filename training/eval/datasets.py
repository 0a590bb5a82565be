"""Labelled images for k-NN and linear evaluation, read from an `EvalDatasetConfig`.

    fashion_mnist: Debian package IDX files --read_fashion_mnist(split)--> (N, 28, 28) grey + labels
    folder:        <root>/<class>/<image> (classes sorted by name, files sorted) --> paths + labels
      --balanced_subset(labels, limit, seed)--> rows kept --> LabelledImages (pixels decoded on access)

A split keeps the label ids of the train split's classes, so a folder test split may hold fewer classes
than train but never one train lacks. Images come out as RGB PIL images, decoded one at a time, so a
large split is never held in memory as pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from pipelines.datasets import FASHION_MNIST_CLASSES, read_fashion_mnist
from pipelines.images import IMAGE_EXTENSIONS, load_rgb
from training.eval.config import EvalDatasetConfig

EvalSplit = Literal["train", "test"]
FASHION_MNIST_KIND = "fashion_mnist"
FOLDER_KIND = "folder"
RGB = "RGB"


class UnreadableImageError(ValueError):
    """An evaluation image that does not decode; the message names its file."""


@dataclass(frozen=True, slots=True)
class LabelledImages:
    """N labelled images of one split, decoded on access.

    Attributes:
        labels_N: int64 class ids, indices into `class_names`.
        class_names: every class of the dataset (the train split's), in label-id order.
        read_image: row index -> RGB image.
    """

    labels_N: np.ndarray
    class_names: tuple[str, ...]
    read_image: Callable[[int], Image.Image]

    def __len__(self) -> int:
        return len(self.labels_N)

    def images(self) -> Iterator[Image.Image]:
        """Every image in row order, decoded one at a time."""
        return (self.read_image(row) for row in range(len(self)))


def dataset_name(cfg: EvalDatasetConfig) -> str:
    """What results tables call the dataset: the kind, or the folder's train root."""
    return FASHION_MNIST_KIND if cfg.kind == FASHION_MNIST_KIND else f"{FOLDER_KIND}:{cfg.train_path}"


def balanced_quotas(class_counts: Sequence[int], limit: int) -> np.ndarray:
    """How many rows to take from each class so that `limit` rows are split as evenly as possible.

    Classes too small for an even share give all they have and the rest goes to the others; a share
    that does not divide evenly gives one extra row to the lowest class ids. `limit` 0, or at least the
    total, takes everything.
    """
    counts = np.asarray(class_counts, dtype=np.int64)
    if limit == 0 or limit >= counts.sum():
        return counts.copy()
    quotas = np.zeros_like(counts)
    open_classes = np.flatnonzero(counts)
    # Why a loop: each pass either places every remaining row or fills at least one class, so it runs at
    # most (number of classes + 1) times.
    while (remaining := limit - int(quotas.sum())) > 0:
        share, extra = divmod(remaining, len(open_classes))
        for position, label in enumerate(open_classes):
            wanted = share + int(position < extra)
            quotas[label] += min(wanted, counts[label] - quotas[label])
        open_classes = open_classes[quotas[open_classes] < counts[open_classes]]
    return quotas


def balanced_subset(labels_N: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted row indices of a class-balanced, seeded random subset of `limit` rows (0: all rows)."""
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    num_classes = int(labels_N.max()) + 1 if len(labels_N) else 0
    quotas = balanced_quotas(np.bincount(labels_N, minlength=num_classes), limit)
    rng = np.random.default_rng(seed)
    chosen = [
        rng.permutation(np.flatnonzero(labels_N == label))[:quota] for label, quota in enumerate(quotas)
    ]
    return np.sort(np.concatenate([np.zeros(0, dtype=np.int64), *chosen]))


def _fashion_mnist(split: EvalSplit) -> tuple[np.ndarray, tuple[str, ...], Callable[[int], Image.Image]]:
    fashion = read_fashion_mnist(split)
    pixels_NHW = fashion.images

    def read_image(row: int) -> Image.Image:
        return Image.fromarray(pixels_NHW[row]).convert(RGB)

    return fashion.labels.astype(np.int64), FASHION_MNIST_CLASSES, read_image


def _class_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"evaluation folder {root} does not exist")
    folders = sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
    if not folders:
        raise ValueError(f"{root}: no class folders (expected <root>/<class>/<image>)")
    return folders


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def read_folder_image(path: Path) -> Image.Image:
    """The RGB image in `path`; raises UnreadableImageError naming the file when it does not decode."""
    try:
        return load_rgb(path.read_bytes())
    except Exception as err:
        # Why so broad: Pillow's parsers raise many exception types on bad bytes; all mean the same here.
        raise UnreadableImageError(f"{path}: cannot decode this evaluation image ({err})") from err


def _folder(root: Path, class_names: tuple[str, ...]) -> tuple[np.ndarray, Callable[[int], Image.Image]]:
    label_of = {name: label for label, name in enumerate(class_names)}
    paths: list[Path] = []
    labels: list[int] = []
    for folder in _class_folders(root):
        if folder.name not in label_of:
            raise ValueError(f"{folder}: class {folder.name!r} is not among the train classes")
        files = _image_files(folder)
        paths.extend(files)
        labels.extend([label_of[folder.name]] * len(files))
    if not paths:
        raise ValueError(f"{root}: no image files in its class folders")

    def read_image(row: int) -> Image.Image:
        return read_folder_image(paths[row])

    return np.asarray(labels, dtype=np.int64), read_image


def load_eval_split(cfg: EvalDatasetConfig, split: EvalSplit, seed: int) -> LabelledImages:
    """One split of the configured dataset, cut to its class-balanced `train_limit`/`test_limit` subset."""
    if cfg.kind == FASHION_MNIST_KIND:
        labels_N, class_names, read_all = _fashion_mnist(split)
    elif cfg.kind == FOLDER_KIND:
        class_names = tuple(folder.name for folder in _class_folders(Path(cfg.train_path)))
        root = Path(cfg.train_path if split == "train" else cfg.test_path)
        labels_N, read_all = _folder(root, class_names)
    else:
        raise ValueError(f"unknown evaluation dataset kind {cfg.kind!r}")
    rows = balanced_subset(labels_N, cfg.train_limit if split == "train" else cfg.test_limit, seed)

    def read_image(row: int) -> Image.Image:
        return read_all(int(rows[row]))

    return LabelledImages(labels_N[rows], class_names, read_image)
