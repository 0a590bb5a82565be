"""Readers for the real, offline image sources the demo is built from (all installed as Debian packages).

    dataset-fashion-mnist     /usr/share/datasets/fashion-mnist/*.gz    28x28 grey, 10 labelled classes
    tuxpaint-stamps-default   /usr/share/tuxpaint/stamps/<class>/...    RGBA photo cut-outs, class = folder
    openclipart-png           /usr/share/openclipart/png/<category>/... clip art, with byte-identical files
    adwaita-icon-theme        /usr/share/icons/Adwaita/<NxN>/<context>  one icon drawn at several sizes

Readers list files and parse headers only; they never decode pixels, so listing all of them is cheap.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
TUXPAINT_STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
OPENCLIPART_DIR = Path("/usr/share/openclipart/png")
ADWAITA_DIR = Path("/usr/share/icons/Adwaita")

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
TUXPAINT_PACKAGE = "tuxpaint-stamps-default"
OPENCLIPART_PACKAGE = "openclipart-png"
ADWAITA_PACKAGE = "adwaita-icon-theme"

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

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The IHDR chunk always comes first: 4-byte length, b"IHDR", then width, height, bit depth, colour type.
_IHDR_OFFSET = len(PNG_SIGNATURE) + 8
_IHDR_FIELDS = struct.Struct(">IIBB")
PNG_COLOUR_TYPE_RGBA = 6
PNG_SUFFIX = ".png"
CAPTION_SUFFIX = ".txt"
_ICON_SIZE_SEPARATOR = "x"


class MissingSourceError(FileNotFoundError):
    """A demo source is not installed; the message names the Debian package that provides it."""

    def __init__(self, what: str, path: Path, package: str) -> None:
        super().__init__(f"{what} not found under {path}: install it with `apt-get install -y {package}`")
        self.package = package


@dataclass(frozen=True, slots=True)
class PngHeader:
    """What a PNG's IHDR chunk says, read without decoding any pixel."""

    width: int
    height: int
    bit_depth: int
    colour_type: int


def read_png_header(data: bytes) -> PngHeader | None:
    """Parses the IHDR of PNG bytes; None when the bytes are not a PNG.

    Why not Pillow: a few Open Clip Art files declare over 600 million pixels, and Pillow's open()
    either raises or warns on those depending on process-wide settings.
    """
    if not data.startswith(PNG_SIGNATURE) or len(data) < _IHDR_OFFSET + _IHDR_FIELDS.size:
        return None
    width, height, bit_depth, colour_type = _IHDR_FIELDS.unpack_from(data, _IHDR_OFFSET)
    return PngHeader(width, height, bit_depth, colour_type)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- Fashion-MNIST ---------------------------------------------------------------------------------


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


# --- Tux Paint stamps ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TuxPaintStamp:
    """One stamp PNG. `label` is the first folder under stamps/; `subfolders` are the finer levels."""

    path: Path
    label: str
    subfolders: tuple[str, ...]
    caption: str | None

    @property
    def name(self) -> str:
        """A name unique within the class: the finer folders and the file stem, joined by '_'."""
        return "_".join((*self.subfolders, self.path.stem))


def list_tuxpaint_stamps(root: Path = TUXPAINT_STAMPS_DIR) -> list[TuxPaintStamp]:
    """All stamp PNGs, sorted by path, each with its class and its English caption when one exists.

    Raises:
        MissingSourceError: no stamp PNG under `root`.
    """
    paths = sorted(root.rglob(f"*{PNG_SUFFIX}")) if root.is_dir() else []
    if not paths:
        raise MissingSourceError("Tux Paint stamps", root, TUXPAINT_PACKAGE)
    stamps = []
    for path in paths:
        label, *subfolders = path.relative_to(root).parent.parts or ("",)
        caption_path = path.with_suffix(CAPTION_SUFFIX)
        caption = caption_path.read_text(errors="replace").strip() if caption_path.is_file() else None
        stamps.append(TuxPaintStamp(path, label, tuple(subfolders), caption))
    return stamps


# --- Open Clip Art ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClipArtFile:
    """One clip-art PNG. `category` is its top-level folder, `folder` its full folder under the root.

    Symlinked files count as files of their own: they read as the same bytes as their target, which is
    what makes them byte-identical duplicates.
    """

    path: Path
    category: str
    folder: str
    sha256: str
    width: int
    height: int


def list_openclipart(root: Path = OPENCLIPART_DIR) -> list[ClipArtFile]:
    """All clip-art PNGs sorted by path, hashed, with their header sizes (no pixel is decoded).

    Raises:
        MissingSourceError: no PNG under `root`.
    """
    paths = sorted(root.rglob(f"*{PNG_SUFFIX}")) if root.is_dir() else []
    if not paths:
        raise MissingSourceError("Open Clip Art PNGs", root, OPENCLIPART_PACKAGE)
    files = []
    for path in paths:
        data = path.read_bytes()
        header = read_png_header(data)
        if header is None:
            continue  # Why: a file named .png that is not one is no use as clean pool content.
        folder = path.relative_to(root).parent
        files.append(
            ClipArtFile(
                path=path,
                category=folder.parts[0] if folder.parts else "",
                folder=folder.as_posix(),
                sha256=sha256_hex(data),
                width=header.width,
                height=header.height,
            )
        )
    return files


def byte_identical_groups(files: list[ClipArtFile]) -> dict[str, list[ClipArtFile]]:
    """Groups of two or more files with the same sha256, keyed by that sha256, members in path order."""
    by_sha: dict[str, list[ClipArtFile]] = defaultdict(list)
    for clip in files:
        by_sha[clip.sha256].append(clip)
    return {sha: members for sha, members in sorted(by_sha.items()) if len(members) > 1}


# --- Adwaita icons ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdwaitaIcon:
    """One icon PNG: `name` is the file name without `.png`, `size` the nominal square size in pixels."""

    path: Path
    name: str
    size: int
    context: str


def list_adwaita_icons(root: Path = ADWAITA_DIR, min_size: int = 0) -> list[AdwaitaIcon]:
    """Icon PNGs from the `<N>x<N>/<context>/` folders, sorted by path, of nominal size >= `min_size`.

    Raises:
        MissingSourceError: no icon PNG under `root`.
    """
    icons = []
    size_dirs = sorted(root.glob(f"*{_ICON_SIZE_SEPARATOR}*")) if root.is_dir() else []
    for size_dir in size_dirs:
        size = _icon_size(size_dir.name)
        if size is None or size < min_size:
            continue
        for path in sorted(size_dir.glob(f"*/*{PNG_SUFFIX}")):
            icons.append(AdwaitaIcon(path, path.name.removesuffix(PNG_SUFFIX), size, path.parent.name))
    if not icons:
        raise MissingSourceError("Adwaita icon PNGs", root, ADWAITA_PACKAGE)
    return icons


def _icon_size(folder_name: str) -> int | None:
    width, _, height = folder_name.partition(_ICON_SIZE_SEPARATOR)
    if not (width.isdigit() and width == height):
        return None
    return int(width)
