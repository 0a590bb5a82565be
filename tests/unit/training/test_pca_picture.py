"""The DINOv2 PCA picture: the PCA fit against covariance eigenvectors, the foreground split, the PNG."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from training.eval.pca_picture import (
    NUM_COMPONENTS,
    fit_pca,
    foreground_mask,
    patch_features,
    pca_picture_png,
    pca_rgb,
    square_crops,
)
from training.models.vit import build_vit

TINY_PATCH = 7
TINY_WIDTH = 64  # vit_test's embed_dim


def _anisotropic_rows(seed: int, rows: int = 300, dim: int = 10) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.linspace(5.0, 0.5, dim)  # distinct variances: a unique ordering of the directions
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    return (rng.normal(size=(rows, dim)) * scales) @ rotation.T + rng.normal(size=dim)


def test_fit_pca_gives_the_top_covariance_eigenvectors_in_variance_order():
    x = _anisotropic_rows(0)
    basis = fit_pca(x, NUM_COMPONENTS)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(x, rowvar=False, ddof=1))
    top = np.argsort(eigenvalues)[::-1][:NUM_COMPONENTS]
    np.testing.assert_allclose(basis.explained_variance_K, eigenvalues[top], rtol=1e-9)
    assert np.all(np.diff(basis.explained_variance_K) < 0)
    # Same directions up to sign, orthonormal rows, and the mean of the rows removed.
    np.testing.assert_allclose(np.abs(np.sum(basis.components_KD * eigenvectors[:, top].T, axis=1)), 1.0)
    np.testing.assert_allclose(
        basis.components_KD @ basis.components_KD.T, np.eye(NUM_COMPONENTS), atol=1e-12
    )
    np.testing.assert_allclose(basis.project(x).mean(axis=0), 0.0, atol=1e-9)


def test_fit_pca_is_deterministic_and_its_signs_do_not_depend_on_row_order():
    x = _anisotropic_rows(1)
    shuffled = x[np.random.default_rng(2).permutation(len(x))]
    first, second = fit_pca(x), fit_pca(shuffled)
    np.testing.assert_allclose(first.components_KD, second.components_KD, atol=1e-9)
    largest = np.abs(first.components_KD).argmax(axis=1)
    assert np.all(first.components_KD[np.arange(NUM_COMPONENTS), largest] > 0)
    with pytest.raises(ValueError, match="cannot fit"):
        fit_pca(x[:2], NUM_COMPONENTS)


def _object_on_background(seed: int, side: int = 6, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Two images of `side` x `side` patches: one feature vector for the background, another for a
    centred object (3x3 in the first image, 2x2 in the second), plus small noise."""
    rng = np.random.default_rng(seed)
    background, thing = rng.normal(size=dim), rng.normal(size=dim) + 3.0
    expected = np.zeros((2, side, side), dtype=bool)
    expected[0, 1:4, 2:5] = True
    expected[1, 2:4, 2:4] = True
    features = np.where(expected[..., None], thing, background) + 0.01 * rng.normal(size=(2, side, side, dim))
    return features, expected


def test_foreground_mask_keeps_the_centred_object_whatever_the_sign_of_the_first_component():
    features, expected = _object_on_background(3)
    np.testing.assert_array_equal(foreground_mask(features), expected)
    np.testing.assert_array_equal(foreground_mask(-features), expected)


def test_foreground_mask_finds_objects_of_opposite_polarity_in_each_image():
    """Image 1 swaps object and background features (a dark item on light vs a light one on dark)."""
    features, expected = _object_on_background(8)
    swapped = features.copy()
    swapped[1] = np.where(expected[1][..., None], features[0, 0, 0], features[0, 2, 3])
    np.testing.assert_array_equal(foreground_mask(swapped), expected)
    with pytest.raises(ValueError, match="no inside"):
        foreground_mask(features[:, :2, :2])


def test_pca_rgb_scales_foreground_components_to_unit_range_and_blacks_out_the_background():
    features, expected = _object_on_background(4)
    rgb = pca_rgb(features, separate_foreground=True)
    assert rgb.shape == (*expected.shape, NUM_COMPONENTS)
    assert np.all(rgb[~expected] == 0.0)
    # Independent check: foreground patches projected on the eigenvectors of their own covariance,
    # min-max scaled; a component may come out mirrored (s or 1 - s).
    foreground = features[expected]
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(foreground, rowvar=False))
    top = eigenvectors[:, np.argsort(eigenvalues)[::-1][:NUM_COMPONENTS]]
    scores = (foreground - foreground.mean(axis=0)) @ top
    scaled = (scores - scores.min(axis=0)) / (scores.max(axis=0) - scores.min(axis=0))
    for component in range(NUM_COMPONENTS):
        got = rgb[expected][:, component]
        assert np.allclose(got, scaled[:, component], atol=1e-9) or np.allclose(
            got, 1.0 - scaled[:, component], atol=1e-9
        )


def test_pca_rgb_without_foreground_split_colours_every_patch():
    features, _ = _object_on_background(5)
    rgb = pca_rgb(features, separate_foreground=False)
    flat = rgb.reshape(-1, NUM_COMPONENTS)
    np.testing.assert_allclose(flat.min(axis=0), 0.0)
    np.testing.assert_allclose(flat.max(axis=0), 1.0)


@pytest.fixture(scope="module")
def tiny_backbone():
    torch.manual_seed(0)
    return build_vit("vit_test", patch_size=TINY_PATCH, img_size=4 * TINY_PATCH).eval()


def _noise_images() -> list[Image.Image]:
    rng = np.random.default_rng(6)
    sizes = [(40, 30), (25, 50), (33, 33)]
    return [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)) for w, h in sizes]


def test_patch_features_are_one_normed_token_per_patch(tiny_backbone):
    crops = square_crops(_noise_images(), 5 * TINY_PATCH)
    assert [crop.size for crop in crops] == [(35, 35)] * 3
    features = patch_features(tiny_backbone, crops)
    assert features.shape == (3, 5, 5, TINY_WIDTH)
    # Final LayerNorm output: every token has (about) zero mean before the affine part, which starts at 1/0.
    np.testing.assert_allclose(features.mean(axis=-1), 0.0, atol=1e-5)


def test_pca_picture_png_lays_out_crops_over_blocky_maps_and_is_deterministic(tiny_backbone):
    images, tile, side = _noise_images(), 20, 4
    png = pca_picture_png(tiny_backbone, images, patches_per_side=side, tile_pixels=tile)
    assert png == pca_picture_png(tiny_backbone, images, patches_per_side=side, tile_pixels=tile)
    picture = np.asarray(Image.open(io.BytesIO(png)))
    assert picture.shape == (2 * tile, len(images) * tile, 3)
    block = tile // side
    maps = picture[tile:].reshape(side, block, len(images) * side, block, 3)
    # Nearest upsampling: every patch is one flat block of colour.
    assert np.all(maps == maps[:, :1, :, :1])
    with pytest.raises(ValueError, match="at least one image"):
        pca_picture_png(tiny_backbone, [])
