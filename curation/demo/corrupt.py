"""Files that a real crawl contains and a decoder must survive: broken, hostile, odd-but-valid.

Each case is one file whose outcome under `pipelines.images.probe_image` (with the default decode limits)
is known in advance: either the `RejectReason` value it must get, or the upright size it must decode to.
Contents are fixed patterns, not random, so the files are the same on every build.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from curation.demo.sources import PNG_SIGNATURE
from pipelines.images import RejectReason

# A bomb claims more pixels than the default limit (89,478,485) while staying a small file: 144 million.
BOMB_SIDE = 12_000
BOMB_BIT_DEPTH = 1  # 1-bit grey: 1500 bytes a row, all zero, so zlib squeezes 18 MB to about 18 kB
PNG_COLOUR_TYPE_GREY = 0
PNG_ROW_FILTER_NONE = b"\x00"
BITS_PER_BYTE = 8
ZLIB_BEST = 9

# Sizes (width, height) of the accepted odd-but-valid files; all sides are >= the default minimum side.
PATTERN_SIZE = (64, 48)
CMYK_SIZE = (48, 40)
GREY16_SIZE = (64, 48)
PALETTE_SIZE = (40, 36)
GIF_SIZE = (32, 24)
GIF_FRAMES = 3
GIF_FRAME_MS = 100
EXIF_STORED_SIZE = (40, 30)  # orientation 6 means "rotate 90 degrees clockwise to view": upright is 30x40
EXIF_ORIENTATION_TAG = 0x0112
EXIF_ROTATE_CLOCKWISE = 6
ICO_SIZE = (32, 32)
PALETTE_COLOURS = 16
UINT16_MAX = 65535
UINT8_LEVELS = 256
JPEG_QUALITY = 90
TRUNCATE_FRACTION = 0.5
INVALID_DEFLATE_BLOCK = b"\xff" * 16  # first byte: final block of reserved type 3, which zlib refuses
ZLIB_HEADER_BYTES = 2
DANGLING_TARGET = "missing-target.jpg"
HOSTILE_SIZE = (40, 40)
TIFF_NEXT_IFD_BYTE = 130  # in Pillow's uncompressed 40x40 RGB TIFF: pointing it past the end breaks frame 2
GIF_BLOCK_SIZE_OFFSET = 2  # graphic control extension: 21 F9 <size>; a size of 1 desyncs the parser
GIF_CONTROL_EXTENSION = b"\x21\xf9\x04"

TEXT_CONTENT = b"This is a plain text note that someone saved with a .jpg name.\n"
HTML_CONTENT = (
    b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
    b"<body><h1>Not Found</h1><p>The requested image was not found on this server.</p></body></html>\n"
)


@dataclass(frozen=True, slots=True)
class CorruptCase:
    """One written file and the outcome the decoder must give it.

    Attributes:
        filename: file name inside the directory given to `write_corrupt_cases`.
        kind: what the file is, e.g. "truncated_png".
        expected_reason: the `RejectReason` value it must be rejected with; None when it must be accepted.
        expected_size: (width, height) after EXIF orientation, for accepted files; None otherwise.
    """

    filename: str
    kind: str
    expected_reason: str | None
    expected_size: tuple[int, int] | None


def _pattern(size: tuple[int, int], channels: int) -> np.ndarray:
    """A busy, deterministic picture (so encoders cannot squeeze it, and truncation cuts real data)."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    planes = [
        ((x * (7 + 5 * c) + y * (13 + 3 * c) + x * y * (c + 1)) % UINT8_LEVELS) for c in range(channels)
    ]
    return np.stack(planes, axis=-1).astype(np.uint8)


def _encode(img: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _png_chunk(chunk_type: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(chunk_type + payload)
    return struct.pack(">I", len(payload)) + chunk_type + payload + struct.pack(">I", crc)


def decompression_bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid all-black 1-bit PNG of side x side pixels, written row by row so it needs little memory."""
    header = struct.pack(">IIBBBBB", side, side, BOMB_BIT_DEPTH, PNG_COLOUR_TYPE_GREY, 0, 0, 0)
    row = PNG_ROW_FILTER_NONE + bytes(-(-side * BOMB_BIT_DEPTH // BITS_PER_BYTE))
    compressor = zlib.compressobj(ZLIB_BEST)
    pieces = [compressor.compress(row) for _ in range(side)]
    pieces.append(compressor.flush())
    return (
        PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(pieces))
        + _png_chunk(b"IEND", b"")
    )


def _broken_deflate_png() -> bytes:
    """A PNG whose chunks are all well formed (valid CRCs) but whose compressed pixels are not deflate."""
    data = _encode(Image.fromarray(_pattern(PATTERN_SIZE, 3), mode="RGB"), "PNG")
    offset = len(PNG_SIGNATURE)
    chunks = []
    while offset < len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        chunk_type = data[offset + 4 : offset + 8]
        payload = data[offset + 8 : offset + 8 + length]
        if chunk_type == b"IDAT":
            payload = payload[:ZLIB_HEADER_BYTES] + INVALID_DEFLATE_BLOCK
        chunks.append(_png_chunk(chunk_type, payload))
        offset += length + 12  # length, type and CRC fields are 4 bytes each
    return PNG_SIGNATURE + b"".join(chunks)


def _grey16_png() -> bytes:
    width, height = GREY16_SIZE
    ramp = np.linspace(0, UINT16_MAX, width * height).reshape(height, width).astype(np.uint16)
    return _encode(Image.fromarray(ramp), "PNG")


def _palette_png() -> bytes:
    img = Image.fromarray(_pattern(PALETTE_SIZE, 3), mode="RGB").quantize(PALETTE_COLOURS)
    return _encode(img, "PNG", transparency=0)


def _animated_gif() -> bytes:
    frames = [
        Image.fromarray(np.roll(_pattern(GIF_SIZE, 3), k, axis=1), mode="RGB") for k in range(GIF_FRAMES)
    ]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=GIF_FRAME_MS, loop=0)


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = EXIF_ROTATE_CLOCKWISE
    img = Image.fromarray(_pattern(EXIF_STORED_SIZE, 3), mode="RGB")
    return _encode(img, "JPEG", quality=JPEG_QUALITY, exif=exif.tobytes())


def _hostile_tiff() -> bytes:
    """A TIFF whose next-frame pointer is garbage: Pillow raises TypeError while counting frames."""
    data = bytearray(_encode(Image.new("RGB", HOSTILE_SIZE), "TIFF"))
    data[TIFF_NEXT_IFD_BYTE] = 0xFF
    return bytes(data)


def _hostile_gif() -> bytes:
    """A 2-frame GIF whose second control block lies about its size: Pillow raises IndexError."""
    frames = [Image.new("RGB", GIF_SIZE, (level, 0, 0)) for level in (0, UINT8_LEVELS // 2)]
    data = bytearray(
        _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=GIF_FRAME_MS)
    )
    second = data.find(GIF_CONTROL_EXTENSION, data.find(GIF_CONTROL_EXTENSION) + 1)
    data[second + GIF_BLOCK_SIZE_OFFSET] = 1
    return bytes(data)


def _truncated(data: bytes) -> bytes:
    return data[: int(len(data) * TRUNCATE_FRACTION)]


def write_corrupt_cases(directory: str | os.PathLike) -> list[CorruptCase]:
    """Writes every case as its own file into `directory` (created if missing) and returns the cases.

    The directory also gets a dangling symlink, which reads as an OSError and must be `unreadable`.
    Unreadable permissions are not written: as root every file is readable, so that case cannot be
    shown by file mode.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(_pattern(PATTERN_SIZE, 3), mode="RGB")
    cmyk = Image.fromarray(_pattern(CMYK_SIZE, 4), mode="CMYK")

    written: list[tuple[str, str, bytes, str | None, tuple[int, int] | None]] = [
        ("zero_bytes", ".jpg", b"", RejectReason.EMPTY_FILE, None),
        (
            "truncated_jpeg",
            ".jpg",
            _truncated(_encode(rgb, "JPEG", quality=JPEG_QUALITY)),
            RejectReason.TRUNCATED,
            None,
        ),
        ("truncated_png", ".png", _truncated(_encode(rgb, "PNG")), RejectReason.TRUNCATED, None),
        ("text_as_jpeg", ".jpg", TEXT_CONTENT, RejectReason.NOT_AN_IMAGE, None),
        ("html_as_png", ".png", HTML_CONTENT, RejectReason.NOT_AN_IMAGE, None),
        ("decompression_bomb", ".png", decompression_bomb_png(), RejectReason.TOO_MANY_PIXELS, None),
        ("one_pixel", ".png", _encode(Image.new("RGB", (1, 1)), "PNG"), RejectReason.TOO_SMALL, None),
        (
            "ico_as_png",
            ".png",
            _encode(rgb.resize(ICO_SIZE), "ICO", sizes=[ICO_SIZE]),
            RejectReason.UNSUPPORTED_FORMAT,
            None,
        ),
        ("broken_deflate_png", ".png", _broken_deflate_png(), RejectReason.DECODE_ERROR, None),
        ("hostile_tiff", ".tif", _hostile_tiff(), RejectReason.DECODE_ERROR, None),
        ("hostile_gif", ".gif", _hostile_gif(), RejectReason.DECODE_ERROR, None),
        ("cmyk_jpeg", ".jpg", _encode(cmyk, "JPEG", quality=JPEG_QUALITY), None, CMYK_SIZE),
        ("grey16_png", ".png", _grey16_png(), None, GREY16_SIZE),
        ("palette_transparency_png", ".png", _palette_png(), None, PALETTE_SIZE),
        ("animated_gif", ".gif", _animated_gif(), None, GIF_SIZE),
        ("exif_rotated_jpeg", ".jpg", _exif_rotated_jpeg(), None, EXIF_STORED_SIZE[::-1]),
    ]
    cases = []
    for kind, extension, data, reason, size in written:
        filename = f"{kind}{extension}"
        (folder / filename).write_bytes(data)
        cases.append(CorruptCase(filename, kind, None if reason is None else str(reason), size))

    dangling = folder / "dangling_symlink.jpg"
    dangling.unlink(missing_ok=True)
    dangling.symlink_to(DANGLING_TARGET)  # relative, so it stays dangling wherever the folder moves
    cases.append(CorruptCase(dangling.name, "dangling_symlink", str(RejectReason.UNREADABLE), None))
    return cases
