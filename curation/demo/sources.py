"""Readers for the real, offline image sources the demo is built from (all installed as Debian packages).

    dataset-fashion-mnist     /usr/share/datasets/fashion-mnist/*.gz    (`pipelines.datasets`, which
                                                                         evaluation reads too)
    tuxpaint-stamps-default   /usr/share/tuxpaint/stamps/<class>/...    RGBA photo cut-outs, class = folder
    openclipart-png           /usr/share/openclipart/png/<category>/... clip art, with byte-identical files
    adwaita-icon-theme        /usr/share/icons/Adwaita/<NxN>/<context>  one icon drawn at several sizes

Readers list files and parse headers only; they never decode pixels, so listing all of them is cheap.
"""

from __future__ import annotations

import hashlib
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pipelines.datasets import MissingSourceError

TUXPAINT_STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
OPENCLIPART_DIR = Path("/usr/share/openclipart/png")
ADWAITA_DIR = Path("/usr/share/icons/Adwaita")

TUXPAINT_PACKAGE = "tuxpaint-stamps-default"
OPENCLIPART_PACKAGE = "openclipart-png"
ADWAITA_PACKAGE = "adwaita-icon-theme"

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The IHDR chunk always comes first: 4-byte length, b"IHDR", then width, height, bit depth, colour type.
_IHDR_OFFSET = len(PNG_SIGNATURE) + 8
_IHDR_FIELDS = struct.Struct(">IIBB")
PNG_COLOUR_TYPE_RGBA = 6
PNG_SUFFIX = ".png"
CAPTION_SUFFIX = ".txt"
_ICON_SIZE_SEPARATOR = "x"


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
