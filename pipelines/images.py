"""Safe image decoding and the three kinds of image source: folders, tar shards, Parquet with bytes.

Every image lands in exactly one of two places: a `ProbedImage` (it decodes, and we know its size,
format and mode) or a `RejectReason` (why it does not). Nothing in here raises on bad image bytes.

URIs name where bytes live, so anything downstream can re-read them:
  folder file    /abs/path/to/img.png
  tar member     /abs/path/to/shard-000000.tar#member/name.jpg
  Parquet row    /abs/path/to/file.parquet#row=17            (bytes in column "image")
                 /abs/path/to/file.parquet#row=17&column=jpg (bytes in another column)
"""

from __future__ import annotations

import enum
import io
import os
import stat
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Why: a truncated file must be rejected, never silently padded with grey pixels.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Why: the per-call `max_pixels` check replaces Pillow's process-wide bomb guard, which only warns
# below 2x its limit and would make the outcome depend on global state.
Image.MAX_IMAGE_PIXELS = None

FRAGMENT_SEPARATOR = "#"
PARQUET_ROW_KEY = "row="
PARQUET_COLUMN_KEY = "&column="
DEFAULT_BYTES_COLUMN = "image"
TAR_SUFFIXES = (".tar",)
PARQUET_SUFFIXES = (".parquet", ".pq")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})
WHITE = (255, 255, 255)
# No image file worth training on is this large; bigger files are rejected unread (memory stays bounded).
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
# Pillow's own decompression-bomb limit: about a quarter of a GiB of 24-bit pixels.
DEFAULT_MAX_PIXELS = 89_478_485
# Images smaller than this on either side carry too little signal for a 14-pixel patch grid.
DEFAULT_MIN_SIDE = 16
# The per-channel normalisation every ImageNet-pretrained model (and DINOv2) expects.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RejectReason(enum.StrEnum):
    """Why an input is not an image we can use. Stored in the `reason` column of `rejected`."""

    EMPTY_FILE = "empty_file"
    UNREADABLE = "unreadable"  # the bytes could not be read: permissions, dangling link, a folder
    NOT_AN_IMAGE = "not_an_image"  # no image format recognised: text, HTML, random bytes
    UNSUPPORTED_FORMAT = "unsupported_format"  # recognised, but not a format we train on
    TRUNCATED = "truncated"
    TOO_MANY_PIXELS = "too_many_pixels"  # decompression bomb guard
    TOO_SMALL = "too_small"
    DECODE_ERROR = "decode_error"  # any other failure while decoding pixels
    NOT_A_FILE = "not_a_file"  # a FIFO, device, socket or folder named like an image: never opened
    TOO_MANY_BYTES = "too_many_bytes"  # larger than the byte limit: never read whole


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Bounds checked before reading, before decoding and after decoding one image."""

    max_pixels: int
    min_side: int
    max_bytes: int = DEFAULT_MAX_BYTES


class UnreadableItem(OSError):
    """Bytes that are not read, and why: `reason` is the rejected row's reason."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def read_regular_file(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of a regular file (through symlinks) of at most `max_bytes` bytes.

    Raises:
        UnreadableItem: not a regular file (a FIFO would block forever, /dev/zero never ends), or larger
            than `max_bytes` (checked on the size, then on what a read returns, in case it grew).
        OSError: the file cannot be read at all (permissions, a dangling link).
    """
    status = os.stat(path)
    if not stat.S_ISREG(status.st_mode):
        raise UnreadableItem(
            RejectReason.NOT_A_FILE, f"not a regular file (mode {stat.filemode(status.st_mode)})"
        )
    if status.st_size > max_bytes:
        raise UnreadableItem(RejectReason.TOO_MANY_BYTES, f"{status.st_size} bytes, limit {max_bytes}")
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UnreadableItem(RejectReason.TOO_MANY_BYTES, f"over {max_bytes} bytes when read")
    return data


@dataclass(frozen=True, slots=True)
class ProbedImage:
    """What a successful decode tells us. Sizes are after EXIF orientation is applied."""

    width: int
    height: int
    format: str
    mode: str
    num_frames: int


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: RejectReason
    detail: str


def folder_uri(path: str | os.PathLike) -> str:
    return str(Path(path).absolute())


def tar_uri(tar_path: str | os.PathLike, member: str) -> str:
    return f"{Path(tar_path).absolute()}{FRAGMENT_SEPARATOR}{member}"


def parquet_uri(parquet_path: str | os.PathLike, row: int, column: str = DEFAULT_BYTES_COLUMN) -> str:
    column_part = "" if column == DEFAULT_BYTES_COLUMN else f"{PARQUET_COLUMN_KEY}{column}"
    return f"{Path(parquet_path).absolute()}{FRAGMENT_SEPARATOR}{PARQUET_ROW_KEY}{row}{column_part}"


def probe_image(data: bytes, limits: DecodeLimits) -> ProbedImage | Rejection:
    """Fully decodes `data` once to prove it is a usable image; never raises on bad bytes."""
    if not data:
        return Rejection(RejectReason.EMPTY_FILE, "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns on odd-but-valid files; we judge them ourselves
            with Image.open(io.BytesIO(data)) as img:
                return _check_open_image(img, limits)
    except UnidentifiedImageError:
        return Rejection(RejectReason.NOT_AN_IMAGE, "no image format recognised")
    except Image.DecompressionBombError as err:
        return Rejection(RejectReason.TOO_MANY_PIXELS, str(err))
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        message = str(err)
        if "truncated" in message or isinstance(err, EOFError):
            return Rejection(RejectReason.TRUNCATED, message)
        return Rejection(RejectReason.DECODE_ERROR, f"{type(err).__name__}: {message}")
    except Exception as err:  # noqa: BLE001
        # Why: Pillow's format parsers raise TypeError, IndexError, struct.error and more on hostile
        # bytes; one bad image must become a rejected row, never stop its shard.
        return Rejection(RejectReason.DECODE_ERROR, f"{type(err).__name__}: {err}")


def _check_open_image(img: Image.Image, limits: DecodeLimits) -> ProbedImage | Rejection:
    image_format = img.format or "unknown"
    if image_format not in SUPPORTED_FORMATS:
        return Rejection(RejectReason.UNSUPPORTED_FORMAT, image_format)
    width, height = img.size  # read from the header: checked before any pixel is decoded
    if width * height > limits.max_pixels:
        return Rejection(RejectReason.TOO_MANY_PIXELS, f"{width}x{height} > {limits.max_pixels} pixels")
    img.load()
    if _exif_swaps_axes(img):
        width, height = height, width
    if min(width, height) < limits.min_side:
        return Rejection(RejectReason.TOO_SMALL, f"{width}x{height}, min side {limits.min_side}")
    return ProbedImage(
        width=width,
        height=height,
        format=image_format,
        mode=img.mode,
        num_frames=getattr(img, "n_frames", 1),
    )


# EXIF orientations 5..8 are transposes and 90-degree rotations: they swap width and height.
_AXIS_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION_TAG = 0x0112


def _exif_swaps_axes(img: Image.Image) -> bool:
    return img.getexif().get(_EXIF_ORIENTATION_TAG) in _AXIS_SWAPPING_ORIENTATIONS


def load_rgb(data: bytes) -> Image.Image:
    """Decodes bytes that `probe_image` accepted into an upright 8-bit RGB image.

    Transparency is composited on white, 16-bit greys are scaled to 8 bits, CMYK is converted, and
    animated images give their first frame.
    """
    with Image.open(io.BytesIO(data)) as img:
        img.seek(0)
        upright = ImageOps.exif_transpose(img)
        return _to_rgb(upright)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Why: PIL's I -> L conversion clips instead of scaling, turning most 16-bit images white.
        img = img.point(lambda value: value / 256).convert("L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def read_bytes(uri: str, byte_offset: int | None = None, byte_size: int | None = None) -> bytes:
    """Reads the bytes behind a URI made by `folder_uri`, `tar_uri` or `parquet_uri`.

    For tar members, `byte_offset`/`byte_size` (stored in the images manifest) allow one seek instead
    of scanning the archive's headers.
    """
    container, fragment = _split_fragment(uri)
    if fragment is None:  # a file ingest accepted: still a regular file, at most the size it had
        return read_regular_file(uri, byte_size if byte_size is not None else DEFAULT_MAX_BYTES)
    if container.endswith(TAR_SUFFIXES):
        if byte_offset is not None and byte_size is not None:
            with open(container, "rb") as handle:
                handle.seek(byte_offset)
                return handle.read(byte_size)
        with tarfile.open(container) as tar:
            extracted = tar.extractfile(fragment)
            if extracted is None:
                raise OSError(f"{fragment} is not a regular file in {container}")
            return extracted.read()
    row_text, _, column = fragment.removeprefix(PARQUET_ROW_KEY).partition(PARQUET_COLUMN_KEY)
    return _read_parquet_cell(container, int(row_text), column or DEFAULT_BYTES_COLUMN)


def read_image_bytes(row: dict) -> bytes:
    """The bytes of an `images` manifest row (uses the stored tar offset when there is one)."""
    return read_bytes(row["uri"], row.get("byte_offset"), row.get("byte_size"))


def load_row_rgb(row: dict) -> Image.Image:
    """Reads and decodes an `images` manifest row to RGB; a read error names the row's URI."""
    try:
        return load_rgb(read_image_bytes(row))
    except OSError as err:
        raise OSError(f"cannot read {row['uri']}: {err}") from err


def _split_fragment(uri: str) -> tuple[str, str | None]:
    """Splits a container URI at the first '#' that follows a tar or Parquet file name.

    A '#' elsewhere (in a folder or file name) is part of the path.
    """
    position = uri.find(FRAGMENT_SEPARATOR)
    while position != -1:
        if uri[:position].endswith(TAR_SUFFIXES + PARQUET_SUFFIXES):
            return uri[:position], uri[position + 1 :]
        position = uri.find(FRAGMENT_SEPARATOR, position + 1)
    return uri, None


def _read_parquet_cell(path: str, row: int, column: str) -> bytes:
    parquet = pq.ParquetFile(path)
    offsets = _row_group_offsets(parquet)
    group = max(index for index, first in enumerate(offsets) if first <= row)
    values = parquet.read_row_group(group, columns=[column]).column(0)
    return values[row - offsets[group]].as_py()


@dataclass(frozen=True, slots=True)
class RawItem:
    """One candidate image as read from a source: bytes, or why they were not read."""

    uri: str
    data: bytes | None
    read_error: str | None = None
    byte_offset: int | None = None  # where a tar member's bytes start inside the archive
    reason: RejectReason = RejectReason.UNREADABLE  # when `data` is None


def list_folder_images(root: str | os.PathLike, extensions: tuple[str, ...]) -> tuple[list[str], int]:
    """Image file URIs under `root` (recursive, sorted) and how many other files were passed over.

    Symlinks are listed like files, so a dangling one is rejected as unreadable rather than lost.
    """
    found, num_ignored = [], 0
    suffixes = tuple(extension.lower() for extension in extensions)
    for directory, _, files in os.walk(root):
        for name in files:
            if name.lower().endswith(suffixes):
                found.append(folder_uri(os.path.join(directory, name)))
            else:
                num_ignored += 1
    return sorted(found), num_ignored


def iter_folder_files(uris: list[str], max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[RawItem]:
    """Each file's bytes; special files and oversized ones are not read, and say why."""
    for uri in uris:
        try:
            yield RawItem(uri, read_regular_file(uri, max_bytes))
        except UnreadableItem as err:
            yield RawItem(uri, None, err.detail, reason=err.reason)
        except OSError as err:
            yield RawItem(uri, None, f"{type(err).__name__}: {err.strerror or err}")


def iter_tar_images(
    tar_path: str | os.PathLike, extensions: tuple[str, ...], max_bytes: int = DEFAULT_MAX_BYTES
) -> Iterator[RawItem]:
    """Image members of a WebDataset-style tar, in archive order; other members are ignored, and an
    oversized image member is not read."""
    with tarfile.open(tar_path) as tar:
        suffixes = tuple(extension.lower() for extension in extensions)
        for member in tar:
            if not member.isfile() or not member.name.lower().endswith(suffixes):
                continue
            uri = tar_uri(tar_path, member.name)
            if member.size > max_bytes:
                detail = f"{member.size} bytes, limit {max_bytes}"
                yield RawItem(uri, None, detail, member.offset_data, RejectReason.TOO_MANY_BYTES)
                continue
            extracted = tar.extractfile(member)
            data = extracted.read() if extracted is not None else None
            error = None if data is not None else "not a regular file"
            yield RawItem(uri, data, error, byte_offset=member.offset_data)


def iter_parquet_images(
    parquet_path: str | os.PathLike,
    bytes_column: str,
    row_groups: list[int],
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Iterator[RawItem]:
    """Rows of the given row groups; the URI carries the row's index in the whole file."""
    parquet = pq.ParquetFile(parquet_path)
    first_row_of_group = _row_group_offsets(parquet)
    for group in row_groups:
        column = parquet.read_row_group(group, columns=[bytes_column]).column(0)
        for offset, value in enumerate(column.to_pylist()):
            row = first_row_of_group[group] + offset
            uri = parquet_uri(parquet_path, row, bytes_column)
            if value is None:
                yield RawItem(uri, None, "null bytes")
            elif len(value) > max_bytes:
                yield RawItem(
                    uri, None, f"{len(value)} bytes, limit {max_bytes}", reason=RejectReason.TOO_MANY_BYTES
                )
            else:
                yield RawItem(uri, value)


def _row_group_offsets(parquet: pq.ParquetFile) -> list[int]:
    offsets, total = [], 0
    for group in range(parquet.metadata.num_row_groups):
        offsets.append(total)
        total += parquet.metadata.row_group(group).num_rows
    return offsets
