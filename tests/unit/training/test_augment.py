"""Multi-crop augmentation: shapes, exact normalisation, effective blur probabilities, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from training.config import CropsConfig
from training.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropAugmentation,
    SeparableGaussianBlur,
    separable_gaussian_blur,
)

GLOBAL_SIZE, LOCAL_SIZE, N_LOCAL = 16, 10, 4  # the blur's reflect padding needs sides > 4
NUM_CALLS = 400  # augmentation calls per blur-probability measurement
PROBABILITY_LOCALS = 2  # fewer locals there: the measurement's cost is per crop
SIGMAS = 4.5  # tolerance, in standard deviations of a measured frequency (0.07 at p = 0.9: 1.0 fails)


def tiny_crops(blur: str = "official", n_local: int = N_LOCAL) -> CropsConfig:
    return CropsConfig(
        global_crops_size=GLOBAL_SIZE, local_crops_size=LOCAL_SIZE, local_crops_number=n_local, blur=blur
    )


def noise_image(seed: int = 0, size: tuple[int, int] = (40, 32)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_output_shapes_and_dtypes():
    crops = MultiCropAugmentation(tiny_crops())(noise_image())
    assert [tuple(t.shape) for t in crops["global_crops"]] == [(3, GLOBAL_SIZE, GLOBAL_SIZE)] * 2
    assert [tuple(t.shape) for t in crops["local_crops"]] == [(3, LOCAL_SIZE, LOCAL_SIZE)] * N_LOCAL
    assert all(t.dtype == torch.float32 for t in crops["global_crops"] + crops["local_crops"])


def test_a_black_image_normalises_to_minus_mean_over_std():
    # Black survives every op: crop, flip, jitter (brightness scales 0, contrast blends with mean 0,
    # saturation and hue keep grey), grayscale, blur, solarize (0 < 128). So each pixel is (0 - m) / s.
    black = Image.new("RGB", (30, 30))
    torch.manual_seed(0)
    crops = MultiCropAugmentation(tiny_crops())(black)
    expected = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    for crop in crops["global_crops"] + crops["local_crops"]:
        torch.testing.assert_close(crop, expected[:, None, None].expand_as(crop), rtol=0, atol=1e-6)


def nested_transforms(transform) -> list:
    """A transform and all inside it (v2 containers keep their children in plain `.transforms` lists)."""
    return [
        transform,
        *(inner for child in getattr(transform, "transforms", []) for inner in nested_transforms(child)),
    ]


def count_blur_calls(augmentation: MultiCropAugmentation) -> dict[str, list[int]]:
    """Counts, per crop pipeline, how often its blur actually ran (forward hooks fire only when applied)."""
    counts = {}
    for name in ("global_view_1", "global_view_2", "local_view"):
        counter = counts.setdefault(name, [0])
        blurs = [
            t for t in nested_transforms(getattr(augmentation, name)) if isinstance(t, SeparableGaussianBlur)
        ]
        assert len(blurs) == 1
        blurs[0].register_forward_hook(lambda *_, counter=counter: counter.__setitem__(0, counter[0] + 1))
    return counts


@pytest.mark.parametrize(
    ("blur", "expected"),
    [
        ("official", {"global_view_1": 0.0, "global_view_2": 0.9, "local_view": 0.5}),
        ("paper", {"global_view_1": 1.0, "global_view_2": 0.1, "local_view": 0.5}),
    ],
)
def test_effective_blur_probabilities(blur, expected):
    augmentation = MultiCropAugmentation(tiny_crops(blur, PROBABILITY_LOCALS))
    counts = count_blur_calls(augmentation)
    image = noise_image()
    torch.manual_seed(1)
    for _ in range(NUM_CALLS):
        augmentation(image)
    draws = {
        "global_view_1": NUM_CALLS,
        "global_view_2": NUM_CALLS,
        "local_view": NUM_CALLS * PROBABILITY_LOCALS,
    }
    for name, probability in expected.items():
        frequency = counts[name][0] / draws[name]
        # A binomial frequency has std sqrt(p (1 - p) / n); p in {0, 1} must come out exact.
        tolerance = SIGMAS * np.sqrt(probability * (1 - probability) / draws[name])
        assert abs(frequency - probability) <= tolerance, (name, frequency)


def test_same_seed_same_crops_and_different_seed_different_crops():
    augmentation = MultiCropAugmentation(tiny_crops())
    image = noise_image()

    def draw(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        crops = augmentation(image)
        return crops["global_crops"] + crops["local_crops"]

    first, again, other = draw(7), draw(7), draw(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("sigma", [0.1, 0.8, 1.9])
def test_separable_blur_equals_torchvision_full_kernel_blur(sigma):
    pixels = torch.randint(0, 256, (3, 37, 29), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    unit = pixels.float() / 255
    reference_unit = TF.gaussian_blur(unit, [9, 9], [sigma, sigma])
    torch.testing.assert_close(separable_gaussian_blur(unit, 9, sigma), reference_unit, rtol=0, atol=1e-6)
    # uint8: the same up to a round-half tie, i.e. off by at most one level on a rare pixel
    difference = (
        separable_gaussian_blur(pixels, 9, sigma).int()
        - TF.gaussian_blur(pixels, [9, 9], [sigma, sigma]).int()
    ).abs()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 1e-3


def test_blur_of_a_constant_image_is_the_same_constant():
    grey = torch.full((3, 12, 12), 77, dtype=torch.uint8)
    assert torch.equal(separable_gaussian_blur(grey, 9, 1.5), grey)
