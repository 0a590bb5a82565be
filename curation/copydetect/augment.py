"""Copy augmentations: what an image may go through on its way to being a copy somewhere else.

    RGB image --edits (PIL, one numpy Generator: reproducible)--> RGB image --to_tensor--> [3, S, S]

Two sets of settings, never mixed:
- `TRAINING`: the SSCD "advanced" list (Pizzi et al., CVPR 2022), in its order, plus padding/borders
  (which SSCD lacks): the strong views the descriptor learns to match. Mix-up and cut-mix of two images
  happen on batches (`train.mix_batch`).
- `held_out_copy`: the edits calibration makes copies with (`calibrate`). Its ranges and text differ
  from training's, so the threshold is chosen on copies the descriptor was not trained on.
"""

from __future__ import annotations

import io
import string
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from curation.embedders.base import normalise
from pipelines.images import IMAGENET_MEAN, IMAGENET_STD

Range = tuple[float, float]
RIGHT_ANGLES = (90, 180, 270)
# Why a reference side: SSCD's blur radii are for 224-pixel crops; smaller crops get smaller radii.
REFERENCE_SIDE = 224
CROP_ATTEMPTS = 10
TEXT_CHARACTERS = string.ascii_letters + string.digits + string.punctuation
MIN_FONT_PIXELS = 6
OPAQUE = 255
# Held-out text is words, not random characters: a caption, a watermark, a price.
HELD_OUT_WORDS = ("copyright", "photo", "ad", "#1", "share", "watch", "v2", "hello world", "$19.99", "LIVE")


@dataclass(frozen=True, slots=True)
class CopyAugmentation:
    """Probabilities and ranges of the SSCD augmentation families (one view of an image)."""

    flip_p: float
    right_angle_p: float
    text_p: float
    text_size: Range  # of the shorter side
    text_opacity: Range
    emoji_p: float
    emoji_size: Range
    emoji_opacity: Range
    any_angle_p: float
    pad_p: float
    pad_fraction: Range  # of each side
    crop_scale: Range  # area kept by the random resized crop
    crop_ratio: Range  # aspect ratio of the crop
    jitter_p: float
    jitter: tuple[float, float, float, float]  # brightness, contrast, saturation, hue
    grey_p: float
    blur_p: float
    blur_radius: Range  # at REFERENCE_SIDE pixels
    jpeg_p: float
    jpeg_quality: tuple[int, int]


# SSCD's ADVANCED settings (transforms/settings.py of the SSCD repository), with borders added.
TRAINING = CopyAugmentation(
    flip_p=0.5,
    right_angle_p=0.05,
    text_p=0.1,
    text_size=(0.1, 0.3),
    text_opacity=(0.1, 1.0),
    emoji_p=0.2,
    emoji_size=(0.1, 0.5),
    emoji_opacity=(0.7, 1.0),
    any_angle_p=0.05,
    pad_p=0.1,
    pad_fraction=(0.02, 0.3),
    crop_scale=(0.08, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    jitter_p=0.8,
    jitter=(0.8, 0.8, 0.8, 0.2),
    grey_p=0.2,
    blur_p=0.5,
    blur_radius=(1.0, 5.0),
    jpeg_p=0.2,
    jpeg_quality=(0, 100),
)


def _uniform(rng: np.random.Generator, bounds: Range) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(value) for value in rng.integers(0, 256, size=3))


def _font(pixels: float) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(MIN_FONT_PIXELS, round(pixels)))


def _blend_layer(img: Image.Image, layer: Image.Image, opacity: float) -> Image.Image:
    """`layer` (RGBA, image-sized) composited over `img` at `opacity`."""
    alpha = layer.getchannel("A").point(lambda value: round(value * opacity))
    layer.putalpha(alpha)
    return Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")


def overlay_text(
    img: Image.Image, rng: np.random.Generator, text: str, size: float, opacity: float
) -> Image.Image:
    """`text` at a random place, `size` of the shorter side high, in a random colour."""
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    font = _font(size * min(img.size))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = int(rng.integers(0, max(0, img.width - (right - left)) + 1)) - left
    y = int(rng.integers(0, max(0, img.height - (bottom - top)) + 1)) - top
    draw.text((x, y), text, font=font, fill=(*_colour(rng), OPAQUE))
    return _blend_layer(img, layer, opacity)


def overlay_emoji(img: Image.Image, rng: np.random.Generator, size: float, opacity: float) -> Image.Image:
    """An emoji-like sticker (a face: disc, eyes, mouth) of `size` of the shorter side, anywhere."""
    side = max(MIN_FONT_PIXELS, round(size * min(img.size)))
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    x = int(rng.integers(0, max(0, img.width - side) + 1))
    y = int(rng.integers(0, max(0, img.height - side) + 1))
    draw.ellipse((x, y, x + side, y + side), fill=(*_colour(rng), OPAQUE))
    feature = (*_colour(rng), OPAQUE)
    eye = max(1, side // 8)
    for centre in (x + side * 0.35, x + side * 0.65):
        draw.ellipse((centre - eye, y + side * 0.35 - eye, centre + eye, y + side * 0.35 + eye), fill=feature)
    draw.arc(
        (x + side * 0.25, y + side * 0.4, x + side * 0.75, y + side * 0.8), 20, 160, fill=feature, width=eye
    )
    return _blend_layer(img, layer, opacity)


def pad(img: Image.Image, rng: np.random.Generator, fraction: Range) -> Image.Image:
    """A border of one random colour, each side `fraction` of the image's side thick."""
    left, right = (round(_uniform(rng, fraction) * img.width) for _ in range(2))
    top, bottom = (round(_uniform(rng, fraction) * img.height) for _ in range(2))
    canvas = Image.new("RGB", (img.width + left + right, img.height + top + bottom), _colour(rng))
    canvas.paste(img, (left, top))
    return canvas


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def random_resized_crop(
    img: Image.Image, rng: np.random.Generator, size: int, scale: Range, ratio: Range
) -> Image.Image:
    """torchvision's RandomResizedCrop, drawn from `rng`: a window of `scale` of the area, resized."""
    area = img.width * img.height
    log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
    for _ in range(CROP_ATTEMPTS):
        target = area * _uniform(rng, scale)
        aspect = float(np.exp(_uniform(rng, log_ratio)))
        width, height = round(np.sqrt(target * aspect)), round(np.sqrt(target / aspect))
        if 0 < width <= img.width and 0 < height <= img.height:
            top = int(rng.integers(0, img.height - height + 1))
            left = int(rng.integers(0, img.width - width + 1))
            return TF.resized_crop(img, top, left, height, width, [size, size])
    return TF.resize(img, [size, size])  # no window fits the ratio (a very long image): the whole image


def colour_jitter(
    img: Image.Image, rng: np.random.Generator, strength: tuple[float, float, float, float]
) -> Image.Image:
    """ColorJitter(brightness, contrast, saturation, hue) in a random order, as torchvision applies it."""
    brightness, contrast, saturation, hue = strength
    edits = [
        lambda image: TF.adjust_brightness(image, _uniform(rng, (1 - brightness, 1 + brightness))),
        lambda image: TF.adjust_contrast(image, _uniform(rng, (1 - contrast, 1 + contrast))),
        lambda image: TF.adjust_saturation(image, _uniform(rng, (1 - saturation, 1 + saturation))),
        lambda image: TF.adjust_hue(image, _uniform(rng, (-hue, hue))),
    ]
    for position in rng.permutation(len(edits)):
        img = edits[position](img)
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """The descriptor's input: ImageNet mean/std (the trunk's own)."""
    tensor = img
    for step in normalise(IMAGENET_MEAN, IMAGENET_STD):
        tensor = step(tensor)
    return tensor


def training_view(
    img: Image.Image, rng: np.random.Generator, size: int, aug: CopyAugmentation = TRAINING
) -> torch.Tensor:
    """One strong view of `img` (RGB) as a normalised [3, size, size] tensor, in SSCD's order."""
    if rng.random() < aug.flip_p:
        img = TF.hflip(img)
    if rng.random() < aug.right_angle_p:
        img = img.rotate(RIGHT_ANGLES[int(rng.integers(len(RIGHT_ANGLES)))], expand=True)
    if rng.random() < aug.text_p:
        length = int(rng.integers(1, 11))
        text = "".join(rng.choice(list(TEXT_CHARACTERS), size=length))
        img = overlay_text(img, rng, text, _uniform(rng, aug.text_size), _uniform(rng, aug.text_opacity))
    if rng.random() < aug.emoji_p:
        img = overlay_emoji(img, rng, _uniform(rng, aug.emoji_size), _uniform(rng, aug.emoji_opacity))
    if rng.random() < aug.any_angle_p:
        img = img.rotate(_uniform(rng, (0.0, 360.0)))
    if rng.random() < aug.pad_p:
        img = pad(img, rng, aug.pad_fraction)
    img = random_resized_crop(img, rng, size, aug.crop_scale, aug.crop_ratio)
    if rng.random() < aug.jitter_p:
        img = colour_jitter(img, rng, aug.jitter)
    if rng.random() < aug.grey_p:
        img = img.convert("L").convert("RGB")
    if rng.random() < aug.blur_p:
        img = img.filter(ImageFilter.GaussianBlur(_uniform(rng, aug.blur_radius) * size / REFERENCE_SIDE))
    if rng.random() < aug.jpeg_p:
        img = jpeg(img, int(rng.integers(aug.jpeg_quality[0], aug.jpeg_quality[1] + 1)))
    return to_tensor(img)


# Held-out edits (calibration): each copy gets 1 or 2 (a copy, not a remix), ranges unlike training's.
HELD_OUT_EDITS_PER_COPY = (1, 2)
HELD_OUT_CROP_SIDE = (0.7, 0.95)
HELD_OUT_PAD = (0.03, 0.2)
HELD_OUT_ANGLE = (2.0, 12.0)
HELD_OUT_DOWNSCALE = (0.3, 0.7)
HELD_OUT_JPEG = (5, 40)
HELD_OUT_TEXT_SIZE = (0.08, 0.2)
HELD_OUT_EMOJI_SIZE = (0.08, 0.25)
HELD_OUT_TONE = (0.6, 1.5)
# Why: below this a copy of a small image is a smudge, not a copy anyone would make.
HELD_OUT_MIN_SIDE = 16


def _held_out_crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    width = max(HELD_OUT_MIN_SIDE, round(img.width * _uniform(rng, HELD_OUT_CROP_SIDE)))
    height = max(HELD_OUT_MIN_SIDE, round(img.height * _uniform(rng, HELD_OUT_CROP_SIDE)))
    left = int(rng.integers(0, max(0, img.width - width) + 1))
    top = int(rng.integers(0, max(0, img.height - height) + 1))
    return img.crop((left, top, left + width, top + height))


def _held_out_rotate(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    angle = _uniform(rng, HELD_OUT_ANGLE) * (1 if rng.random() < 0.5 else -1)
    return img.rotate(angle, expand=True, fillcolor=_colour(rng))


def _held_out_downscale(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    factor = _uniform(rng, HELD_OUT_DOWNSCALE)
    small = (
        max(HELD_OUT_MIN_SIDE, round(img.width * factor)),
        max(HELD_OUT_MIN_SIDE, round(img.height * factor)),
    )
    return img.resize(small, Image.Resampling.BILINEAR).resize(img.size, Image.Resampling.BILINEAR)


def _held_out_tone(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    img = TF.adjust_brightness(img, _uniform(rng, HELD_OUT_TONE))
    return TF.adjust_contrast(img, _uniform(rng, HELD_OUT_TONE))


def _held_out_text(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    word = HELD_OUT_WORDS[int(rng.integers(len(HELD_OUT_WORDS)))]
    return overlay_text(img, rng, word, _uniform(rng, HELD_OUT_TEXT_SIZE), 1.0)


HELD_OUT_EDITS = (
    _held_out_crop,
    lambda img, rng: pad(img, rng, HELD_OUT_PAD),
    _held_out_rotate,
    _held_out_downscale,
    lambda img, rng: jpeg(img, int(rng.integers(HELD_OUT_JPEG[0], HELD_OUT_JPEG[1] + 1))),
    _held_out_text,
    lambda img, rng: overlay_emoji(img, rng, _uniform(rng, HELD_OUT_EMOJI_SIZE), 1.0),
    _held_out_tone,
    lambda img, rng: img.convert("L").convert("RGB"),
    lambda img, rng: TF.hflip(img),
)


def held_out_copy(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A synthetic copy of `img` (RGB) for calibration: 1 or 2 distinct held-out edits, in random order."""
    count = int(rng.integers(HELD_OUT_EDITS_PER_COPY[0], HELD_OUT_EDITS_PER_COPY[1] + 1))
    for position in rng.choice(len(HELD_OUT_EDITS), size=count, replace=False):
        img = HELD_OUT_EDITS[position](img, rng)
    return img
