"""Labelled image datasets installed as Debian packages, read where the package puts them.

    dataset-fashion-mnist   /usr/share/datasets/fashion-mnist/*.gz   gzipped IDX: 28x28 grey, 10 classes
      --read_fashion_mnist(split)--> FashionMnist(images (N, 28, 28) uint8, labels (N,) uint8)

Both floors read it: evaluation (the Fashion-MNIST test set) and the demo builder (its seed, pool and
eval images), so it lives in the spine and neither imports the other for it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
# Class names in label-id order, as published with the data set.
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FashionSplit = Literal["train", "test"]
_FASHION_FILE_PREFIX: dict[str, str] = {"train": "train", "test": "t10k"}
# IDX headers: a big-endian magic number, then one big-endian uint32 per dimension.
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_IDX_IMAGES_HEADER = struct.Struct(">IIII")  # magic, count, rows, columns: 16 bytes
_IDX_LABELS_HEADER = struct.Struct(">II")  # magic, count: 8 bytes


class MissingSourceError(FileNotFoundError):
    """A dataset (or demo source) is not installed; the message names the Debian package that provides it."""

    def __init__(self, what: str, path: Path, package: str) -> None:
        super().__init__(f"{what} not found under {path}: install it with `apt-get install -y {package}`")
        self.package = package


@dataclass(frozen=True, slots=True)
class FashionMnist:
    """One split of Fashion-MNIST: `images` is (N, 28, 28) uint8, `labels` is (N,) uint8 class ids."""

    images: np.ndarray
    labels: np.ndarray

    @property
    def class_names(self) -> tuple[str, ...]:
        return FASHION_MNIST_CLASSES


def read_fashion_mnist(split: FashionSplit, root: Path = FASHION_MNIST_DIR) -> FashionMnist:
    """Reads one split from the gzipped IDX files of the Debian package.

    Args:
        split: "train" (60000 images) or "test" (10000 images).
        root: folder holding `<prefix>-images-idx3-ubyte.gz` and `<prefix>-labels-idx1-ubyte.gz`.

    Raises:
        MissingSourceError: the files are not there.
        ValueError: a file is not the IDX layout we expect, or images and labels disagree in count.
    """
    prefix = _FASHION_FILE_PREFIX[split]
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    for path in (images_path, labels_path):
        if not path.is_file():
            raise MissingSourceError("Fashion-MNIST", path, FASHION_MNIST_PACKAGE)
    images = _read_idx_images(gzip.decompress(images_path.read_bytes()), images_path)
    labels = _read_idx_labels(gzip.decompress(labels_path.read_bytes()), labels_path)
    if len(images) != len(labels):
        raise ValueError(f"{images_path}: {len(images)} images but {len(labels)} labels")
    return FashionMnist(images=images, labels=labels)


def _read_idx_images(raw: bytes, path: Path) -> np.ndarray:
    magic, count, rows, columns = _IDX_IMAGES_HEADER.unpack_from(raw)
    if magic != _IDX_IMAGES_MAGIC:
        raise ValueError(f"{path}: IDX magic {magic}, expected {_IDX_IMAGES_MAGIC} for images")
    pixels = np.frombuffer(raw, dtype=np.uint8, offset=_IDX_IMAGES_HEADER.size)
    return pixels.reshape(count, rows, columns)


def _read_idx_labels(raw: bytes, path: Path) -> np.ndarray:
    magic, count = _IDX_LABELS_HEADER.unpack_from(raw)
    if magic != _IDX_LABELS_MAGIC:
        raise ValueError(f"{path}: IDX magic {magic}, expected {_IDX_LABELS_MAGIC} for labels")
    labels = np.frombuffer(raw, dtype=np.uint8, offset=_IDX_LABELS_HEADER.size)
    if len(labels) != count:
        raise ValueError(f"{path}: header says {count} labels, file holds {len(labels)}")
    return labels


def write_fashion_mnist_pngs(folder: Path, count: int, split: FashionSplit = "train") -> pa.Table:
    """The first `count` images of a split written as PNG files into `folder`, as a table of the columns
    training reads (image_id, uri, container, byte_offset, byte_size) plus each image's `label`: small real
    training sets for tests and benchmarks."""
    fashion = read_fashion_mnist(split)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        buffer = io.BytesIO()
        Image.fromarray(fashion.images[index]).save(buffer, format="PNG")
        data = buffer.getvalue()
        path = folder / f"{index:05d}.png"
        path.write_bytes(data)
        rows.append(
            {
                "image_id": hashlib.sha256(data).hexdigest(),
                "uri": str(path),
                "container": "file",
                "byte_offset": None,
                "byte_size": len(data),
                "label": int(fashion.labels[index]),
            }
        )
    return pa.Table.from_pylist(rows)
