"""Block-wise masks for iBOT (recipe 3.3): a target patch count -> a (H, W) bool mask of rectangles.

    target --while masked < target: budget = min(target - masked, max_num_patches)--> try_block(budget)
      try_block: up to 10 draws of (area ~ U(min, budget), log-uniform aspect) -> an h x w rectangle at a
      random place; accepted when it adds between 1 and `budget` new patches --> mask (never over target)

All randomness comes from the `random.Random` handed in, so a seeded generator gives the same masks.
"""

from __future__ import annotations

import math
import random

import numpy as np

BLOCK_ATTEMPTS = 10
DEFAULT_MIN_NUM_PATCHES = 4
DEFAULT_MIN_ASPECT = 0.3
MAX_MASKED_FRACTION = 0.5


def official_max_num_patches(img_size: int, patch_size: int) -> float:
    """The official cap on one block, `0.5 * img // p * img // p` with Python's left-to-right precedence.

    For 224/14 that is 128.0 (= 0.5 * 256), but e.g. 518/14 gives 666.0, not 684.5: we keep the expression.
    """
    return MAX_MASKED_FRACTION * img_size // patch_size * img_size // patch_size


class MaskingGenerator:
    """Draws block-wise masks over an `input_size` = (H, W) patch grid."""

    def __init__(
        self,
        input_size: tuple[int, int],
        max_num_patches: float,
        min_num_patches: int = DEFAULT_MIN_NUM_PATCHES,
        min_aspect: float = DEFAULT_MIN_ASPECT,
        max_aspect: float | None = None,
        *,
        rng: random.Random,
    ) -> None:
        self.height, self.width = input_size
        self.max_num_patches = max_num_patches
        self.min_num_patches = min_num_patches
        max_aspect = 1 / min_aspect if max_aspect is None else max_aspect
        self.log_aspect_range = (math.log(min_aspect), math.log(max_aspect))
        self.rng = rng

    def __call__(self, num_masking_patches: int = 0) -> np.ndarray:
        """A (H, W) bool mask with at most `num_masking_patches` True entries (it may stop short)."""
        mask_HW = np.zeros((self.height, self.width), dtype=bool)
        masked = 0
        while masked < num_masking_patches:
            budget = min(num_masking_patches - masked, self.max_num_patches)
            added = self.add_block(mask_HW, budget)
            if added == 0:
                break
            masked += added
        return mask_HW

    def add_block(self, mask_HW: np.ndarray, budget: float) -> int:
        """Masks one rectangle adding 1..budget new patches; returns how many it added (0: none fitted)."""
        for _ in range(BLOCK_ATTEMPTS):
            area = self.rng.uniform(self.min_num_patches, budget)
            aspect = math.exp(self.rng.uniform(*self.log_aspect_range))
            height = round(math.sqrt(area * aspect))
            width = round(math.sqrt(area / aspect))
            if width < self.width and height < self.height:
                top = self.rng.randint(0, self.height - height)
                left = self.rng.randint(0, self.width - width)
                block = mask_HW[top : top + height, left : left + width]
                added = height * width - int(block.sum())
                if 0 < added <= budget:
                    block[...] = True
                    return added
        return 0
