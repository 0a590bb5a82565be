"""Batch collation with iBOT mask sampling (recipe 3.4): B multi-crop samples -> one training batch.

samples[b] = {"global_crops": [g1, g2], "local_crops": [l1..ln]}
  --crop-major stack--> collated_global_crops (2B, 3, G, G) = [g1 of images 1..B, g2 of images 1..B]
                        collated_local_crops  (nB, 3, L, L) = [l1 of images 1..B, ..., ln of images 1..B]
  --int(2B * p) masks with stratified ratios, empty masks for the rest, shuffled--> collated_masks (2B, N)
  --> mask_indices_list, masks_weight, upperbound, n_masked_patches (what the iBOT loss needs)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
import torch

IMAGE_CHANNELS = 3


def collate_crops_and_masks(
    samples: Sequence[dict],
    *,
    mask_ratio_min_max: tuple[float, ...],
    mask_probability: float,
    n_tokens: int,
    mask_generator: Callable[[int], np.ndarray],
    rng: random.Random,
    dtype: torch.dtype = torch.float32,
    local_crops_size: int = 0,
) -> dict:
    """Stacks the crops and samples the masks of the global crops.

    `local_crops_size` only sizes the empty (0, 3, L, L) local tensor when the samples carry no local crops.
    """
    global_crops = _stack_crop_major(samples, "global_crops").to(dtype)
    if samples[0]["local_crops"]:
        local_crops = _stack_crop_major(samples, "local_crops").to(dtype)
    else:
        local_crops = torch.empty((0, IMAGE_CHANNELS, local_crops_size, local_crops_size), dtype=dtype)

    n_crops = len(global_crops)
    n_masked_crops = int(n_crops * mask_probability)
    # Why float32 tensors: the official code draws targets and bounds in float32; float64 would move
    # int() truncations at a few boundaries.
    ratio_edges = torch.linspace(*mask_ratio_min_max, n_masked_crops + 1)
    masks = []
    upperbound = 0
    for index in range(n_masked_crops):
        ratio = rng.uniform(ratio_edges[index], ratio_edges[index + 1])
        masks.append(torch.from_numpy(mask_generator(int(n_tokens * ratio))))
        upperbound += int(n_tokens * ratio_edges[index + 1])
    masks.extend(torch.from_numpy(mask_generator(0)) for _ in range(n_crops - n_masked_crops))
    # Why shuffle: which crop (and which view of an image) is masked must be random.
    rng.shuffle(masks)

    masks_MN = torch.stack(masks).flatten(1)
    mask_indices = masks_MN.flatten().nonzero().flatten()
    masked_per_crop_M = masks_MN.sum(dim=-1).clamp(min=1).to(torch.float32)
    masks_weight = (1 / masked_per_crop_M).unsqueeze(-1).expand_as(masks_MN)[masks_MN]
    return {
        "collated_global_crops": global_crops,
        "collated_local_crops": local_crops,
        "collated_masks": masks_MN,
        "mask_indices_list": mask_indices,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), len(mask_indices), dtype=torch.long),
    }


def _stack_crop_major(samples: Sequence[dict], key: str) -> torch.Tensor:
    n_views = len(samples[0][key])
    return torch.stack([sample[key][view] for view in range(n_views) for sample in samples])
