"""The DINOv2 picture: the first three PCA components of a backbone's patch features, shown as RGB.

    images --centre square crop, resize to R * patch px--> backbone.forward_features --> patches (N, R, R, D)
      --fit_pca on the patches of all images together (optionally, as the paper's figure does: threshold
        the first component, per image keep the side its border lacks, fit again on those patches only)
      --> 3 components per patch, min-max scaled to [0, 1] --> RGB maps (N, R, R, 3), background black
      --> PNG: the crops on the top row, their maps (upsampled) below

Shapes: N images, R patches per side, M patches in all, D feature width, K components.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from torchvision.transforms import functional as TF

from pipelines.images import IMAGENET_MEAN, IMAGENET_STD, load_row_rgb

NUM_COMPONENTS = 3  # one per colour channel
PATCHES_PER_SIDE = 16  # 224 px for patch 14, the resolution the backbones are trained at
TILE_PIXELS = 160
FOREGROUND_THRESHOLD = 0.0  # first-component scores are centred: foreground lies above their mean
MIN_SCALE_RANGE = 1e-12
MIN_SIDE_FOR_BORDER = 3  # a border ring of patches around at least one inside patch
BORDER_MAJORITY = 0.5  # a side holding more than this share of the border is background
BACKGROUND = (0, 0, 0)
RGB_MAX = 255
CANDIDATE_ROWS = 10_000  # `spread_images` picks among this many first rows of a manifest


@dataclass(frozen=True, slots=True)
class PcaBasis:
    """A PCA fit: the mean, K orthonormal directions (rows) and the variance each explains, largest first."""

    mean_D: np.ndarray
    components_KD: np.ndarray
    explained_variance_K: np.ndarray

    def project(self, x_MD: np.ndarray) -> np.ndarray:
        """Scores (M, K) of rows of x along the components."""
        return (x_MD - self.mean_D) @ self.components_KD.T


def fit_pca(x_MD: np.ndarray, num_components: int = NUM_COMPONENTS) -> PcaBasis:
    """The top `num_components` principal directions of the rows of x (float64 SVD of the centred rows).

    Each direction's sign is fixed so that its largest-magnitude loading is positive: SVD signs are
    arbitrary, and the picture's colours must not flip between runs or machines.
    """
    rows, dim = x_MD.shape
    if not 0 < num_components <= min(rows, dim):
        raise ValueError(f"cannot fit {num_components} components on {rows} rows of width {dim}")
    x_MD = np.asarray(x_MD, dtype=np.float64)
    mean_D = x_MD.mean(axis=0)
    _, singular_values, vt_DD = np.linalg.svd(x_MD - mean_D, full_matrices=False)
    components_KD = vt_DD[:num_components]
    largest = np.abs(components_KD).argmax(axis=1)
    signs_K = np.sign(components_KD[np.arange(num_components), largest])
    variance_K = singular_values[:num_components] ** 2 / max(rows - 1, 1)
    return PcaBasis(mean_D, components_KD * signs_K[:, None], variance_K)


def square_crops(images: Sequence[Image.Image], side: int) -> list[Image.Image]:
    """Centre square crops resized to `side` px (bicubic): what the backbone sees and the page shows."""
    return [
        ImageOps.fit(image.convert("RGB"), (side, side), method=Image.Resampling.BICUBIC) for image in images
    ]


def patch_features(backbone: nn.Module, crops: Sequence[Image.Image]) -> np.ndarray:
    """Final-normed patch tokens (N, R, R, D) of square crops whose side is a multiple of the patch size."""
    side = crops[0].width
    patches_per_side = side // backbone.patch_size
    images_BCHW = torch.stack(
        [TF.normalize(TF.to_tensor(crop), list(IMAGENET_MEAN), list(IMAGENET_STD)) for crop in crops]
    )
    backbone.eval()
    with torch.inference_mode():
        patches_BPD = backbone.forward_features(images_BCHW)["x_norm_patchtokens"]
    return patches_BPD.float().reshape(len(crops), patches_per_side, patches_per_side, -1).numpy()


def _border_mask(patches_per_side: int) -> np.ndarray:
    mask = np.ones((patches_per_side, patches_per_side), dtype=bool)
    mask[1:-1, 1:-1] = False
    return mask


def foreground_mask(features_NRRD: np.ndarray) -> np.ndarray:
    """Foreground patches (N, R, R): per image, the side of the first component's threshold that holds
    fewer of the image's border patches.

    Objects sit inside the frame, so the borders are mostly background. Why per image: a weakly trained
    backbone's first component often tracks brightness, so dark-on-light and light-on-dark images land
    on opposite sides of it; with a good backbone every image picks the same side.
    """
    count, side, _, dim = features_NRRD.shape
    if side < MIN_SIDE_FOR_BORDER:
        raise ValueError(f"{side} x {side} patches have no inside to tell from the border")
    patches_MD = features_NRRD.reshape(-1, dim)
    above_NRR = fit_pca(patches_MD, 1).project(patches_MD).reshape(count, side, side) > FOREGROUND_THRESHOLD
    border_above_N = above_NRR[:, _border_mask(side)].mean(axis=1)
    return np.where((border_above_N > BORDER_MAJORITY)[:, None, None], ~above_NRR, above_NRR)


def pca_rgb(features_NRRD: np.ndarray, separate_foreground: bool = True) -> np.ndarray:
    """RGB maps (N, R, R, 3) in [0, 1]: the first three components, each min-max scaled over all images.

    With `separate_foreground`, the PCA is fitted again on the foreground patches only and the background
    is black; with too few foreground patches to fit, every patch counts as foreground.
    """
    keep_NRR = np.ones(features_NRRD.shape[:-1], dtype=bool)
    if separate_foreground:
        foreground = foreground_mask(features_NRRD)
        if foreground.sum() > NUM_COMPONENTS:
            keep_NRR = foreground
    kept_MD = features_NRRD[keep_NRR]
    scores_MK = fit_pca(kept_MD, NUM_COMPONENTS).project(kept_MD)
    low_K, high_K = scores_MK.min(axis=0), scores_MK.max(axis=0)
    scaled_MK = (scores_MK - low_K) / np.maximum(high_K - low_K, MIN_SCALE_RANGE)
    rgb_NRR3 = np.zeros((*features_NRRD.shape[:-1], NUM_COMPONENTS))
    rgb_NRR3[keep_NRR] = scaled_MK
    return rgb_NRR3


def _picture(crops: Sequence[Image.Image], rgb_NRR3: np.ndarray, tile_pixels: int) -> Image.Image:
    sheet = Image.new("RGB", (tile_pixels * len(crops), 2 * tile_pixels), BACKGROUND)
    for column, (crop, rgb_RR3) in enumerate(zip(crops, rgb_NRR3, strict=True)):
        pixels = np.round(rgb_RR3 * RGB_MAX).astype(np.uint8)
        # Why nearest: one flat block per patch shows the true resolution of the features.
        pca_map = Image.fromarray(pixels).resize((tile_pixels, tile_pixels), Image.Resampling.NEAREST)
        sheet.paste(
            crop.resize((tile_pixels, tile_pixels), Image.Resampling.BICUBIC), (column * tile_pixels, 0)
        )
        sheet.paste(pca_map, (column * tile_pixels, tile_pixels))
    return sheet


def pca_picture_png(
    backbone: nn.Module,
    images: Sequence[Image.Image],
    *,
    patches_per_side: int = PATCHES_PER_SIDE,
    separate_foreground: bool = True,
    tile_pixels: int = TILE_PIXELS,
) -> bytes:
    """A PNG of `tile_pixels` squares: the images' crops on top, their PCA maps below (one column each)."""
    if not images:
        raise ValueError("pca_picture_png needs at least one image")
    crops = square_crops(images, patches_per_side * backbone.patch_size)
    rgb_NRR3 = pca_rgb(patch_features(backbone, crops), separate_foreground)
    buffer = io.BytesIO()
    _picture(crops, rgb_NRR3, tile_pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def spread_images(manifest_uri: str, count: int) -> list[Image.Image]:
    """`count` images of a manifest spread evenly over the image ids of its first rows: the same ones on
    every run, and a large manifest is never read whole."""
    # Why imported here: pyarrow.dataset imports pandas (~200 MB) into every process that imports this.
    import pyarrow.dataset as pa_dataset

    first_rows = pa_dataset.dataset(manifest_uri, format="parquet").head(CANDIDATE_ROWS)
    rows = {row["image_id"]: row for row in first_rows.to_pylist()}
    ids = sorted(rows)
    picks = sorted(set(np.linspace(0, len(ids) - 1, min(count, len(ids))).round().astype(int)))
    return [load_row_rgb(rows[ids[index]]) for index in picks]
