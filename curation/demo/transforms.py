"""Near-duplicate transforms: each one takes a PIL image and a numpy Generator and returns encoded bytes.

Every transform is deterministic given the Generator's state, keeps both sides at least
`DEFAULT_MIN_SIDE` pixels (so the copy is still an image the decoder accepts), and changes pixels, so a
near copy is never byte-identical to its original.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from pipelines.images import DEFAULT_MIN_SIDE

PNG_EXTENSION = ".png"
JPEG_EXTENSION = ".jpg"
WHITE = (255, 255, 255)
OPAQUE = 255

JPEG_QUALITY_RANGE = (30, 85)
# Why two bands: a scale close to 1 could give back the original size and so the original pixels.
RESIZE_SHRINK_RANGE = (0.6, 0.85)
RESIZE_GROW_RANGE = (1.2, 2.0)
CROP_KEEP_RANGE = (0.8, 0.9)
# Hue offset as a fraction of the colour wheel, kept away from 0 and 1 (no visible change).
HUE_SHIFT_RANGE = (0.1, 0.9)
BRIGHTNESS_DARKER_RANGE = (0.6, 0.85)
BRIGHTNESS_BRIGHTER_RANGE = (1.15, 1.4)
HUE_LEVELS = 256  # PIL stores hue in one byte
# Why: text drawn on a 28-pixel image is an unreadable smudge; upsample so the overlay is real text.
TEXT_MIN_CANVAS_SIDE = 112
TEXT_HEIGHT_FRACTION = 0.18
TEXT_CAPTIONS = ("SALE", "sample", "(c) 2024", "NEW!", "lvd demo", "stock photo", "50% off", "preview")
# Grey images get a light caption: a dark one would vanish on the black Fashion-MNIST background.
TEXT_GREY_RANGE = (160, 255)


@dataclass(frozen=True, slots=True)
class NearCopy:
    """The encoded bytes of a transformed image, the transform's name and the file extension to use."""

    data: bytes
    transform: str
    extension: str


Transform = Callable[[Image.Image, np.random.Generator], NearCopy]


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _one_of_bands(rng: np.random.Generator, low: tuple[float, float], high: tuple[float, float]) -> float:
    return _uniform(rng, low if rng.integers(2) == 0 else high)


def _working_mode(img: Image.Image) -> Image.Image:
    """L, RGB and RGBA pass through; palette and grey+alpha images become RGBA (transforms need them)."""
    if img.mode in ("L", "RGB", "RGBA"):
        return img
    has_alpha = img.mode in ("LA", "PA", "RGBa", "La") or "transparency" in img.info
    return img.convert("RGBA" if has_alpha else "RGB")


def encode_png(img: Image.Image) -> bytes:
    """PNG bytes with no metadata, so the same pixels always give the same bytes."""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def _encode_png(img: Image.Image, transform: str) -> NearCopy:
    return NearCopy(encode_png(img), transform, PNG_EXTENSION)


def _on_white(img: Image.Image) -> Image.Image:
    """Alpha composited on white, because JPEG has no alpha channel."""
    if img.mode != "RGBA":
        return img
    background = Image.new("RGB", img.size, WHITE)
    background.paste(img, mask=img.getchannel("A"))
    return background


def jpeg_reencode(img: Image.Image, rng: np.random.Generator) -> NearCopy:
    """Re-encodes as JPEG at a random quality: the compression artefacts a re-upload adds."""
    quality = int(rng.integers(JPEG_QUALITY_RANGE[0], JPEG_QUALITY_RANGE[1] + 1))
    buffer = io.BytesIO()
    _on_white(_working_mode(img)).save(buffer, format="JPEG", quality=quality)
    return NearCopy(buffer.getvalue(), "jpeg_reencode", JPEG_EXTENSION)


def resize(img: Image.Image, rng: np.random.Generator) -> NearCopy:
    """Scales by a random factor away from 1, never below `DEFAULT_MIN_SIDE` on the shorter side."""
    img = _working_mode(img)
    scale = _one_of_bands(rng, RESIZE_SHRINK_RANGE, RESIZE_GROW_RANGE)
    scale = max(scale, DEFAULT_MIN_SIDE / min(img.size))
    size = (max(DEFAULT_MIN_SIDE, round(img.width * scale)), max(DEFAULT_MIN_SIDE, round(img.height * scale)))
    if size == img.size:
        # Why: only hit for images already at the minimum side; growing is the one change left.
        size = (img.width + 1, img.height + 1)
    return _encode_png(img.resize(size, Image.Resampling.LANCZOS), "resize")


def crop(img: Image.Image, rng: np.random.Generator) -> NearCopy:
    """Keeps a random window of 80-90% of each side, as a re-framed copy would."""
    img = _working_mode(img)
    keep = _uniform(rng, CROP_KEEP_RANGE)
    width = max(min(img.width, DEFAULT_MIN_SIDE), round(img.width * keep))
    height = max(min(img.height, DEFAULT_MIN_SIDE), round(img.height * keep))
    if (width, height) == img.size:
        # Why: a window as large as the image is no crop; such tiny images get resized instead.
        return resize(img, rng)
    left = int(rng.integers(0, img.width - width + 1))
    top = int(rng.integers(0, img.height - height + 1))
    return _encode_png(img.crop((left, top, left + width, top + height)), "crop")


def colour_shift(img: Image.Image, rng: np.random.Generator) -> NearCopy:
    """Rotates the hue (colour images) and scales the brightness (all images)."""
    img = _working_mode(img)
    alpha = img.getchannel("A") if img.mode == "RGBA" else None
    if img.mode != "L":
        hsv = np.array(img.convert("RGB").convert("HSV"))
        shift = round(_uniform(rng, HUE_SHIFT_RANGE) * HUE_LEVELS)
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + shift) % HUE_LEVELS
        img = Image.fromarray(hsv, mode="HSV").convert("RGB")
    factor = _one_of_bands(rng, BRIGHTNESS_DARKER_RANGE, BRIGHTNESS_BRIGHTER_RANGE)
    img = ImageEnhance.Brightness(img).enhance(factor)
    if alpha is not None:
        img.putalpha(alpha)
    return _encode_png(img, "colour_shift")


def text_overlay(img: Image.Image, rng: np.random.Generator) -> NearCopy:
    """Stamps a short caption (a watermark, a price tag) at a random place in a random colour."""
    img = _working_mode(img)
    if min(img.size) < TEXT_MIN_CANVAS_SIDE:
        factor = TEXT_MIN_CANVAS_SIDE / min(img.size)
        img = img.resize((round(img.width * factor), round(img.height * factor)), Image.Resampling.LANCZOS)
    else:
        img = img.copy()
    caption = TEXT_CAPTIONS[int(rng.integers(len(TEXT_CAPTIONS)))]
    font = ImageFont.load_default(size=max(1, round(min(img.size) * TEXT_HEIGHT_FRACTION)))
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
    margin_x = max(0, img.width - (right - left))
    margin_y = max(0, img.height - (bottom - top))
    x = int(rng.integers(0, margin_x + 1)) - left
    y = int(rng.integers(0, margin_y + 1)) - top
    fill: int | tuple[int, ...]
    if img.mode == "L":
        fill = int(rng.integers(TEXT_GREY_RANGE[0], TEXT_GREY_RANGE[1] + 1))
    else:
        colour = tuple(int(value) for value in rng.integers(0, 256, size=3))
        fill = (*colour, OPAQUE) if img.mode == "RGBA" else colour
    draw.text((x, y), caption, font=font, fill=fill)
    return _encode_png(img, "text_overlay")


TRANSFORMS: dict[str, Transform] = {
    "jpeg_reencode": jpeg_reencode,
    "resize": resize,
    "crop": crop,
    "colour_shift": colour_shift,
    "text_overlay": text_overlay,
}
