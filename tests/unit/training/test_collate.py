"""Collation: crop-major stacking, int(2B p) stratified masks, upperbound, mask indices and weights."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from training.data.collate import collate_crops_and_masks
from training.data.masking import MaskingGenerator, official_max_num_patches

GRID = (16, 16)
N_TOKENS = 256
RATIOS = (0.1, 0.5)
GLOBAL_SIZE, LOCAL_SIZE = 4, 2  # pixel sizes only matter for shapes here


def labelled_samples(batch_size: int, n_local: int) -> list[dict]:
    """Crop tensors filled with a label that says which image and which view they are."""
    return [
        {
            "global_crops": [
                torch.full((3, GLOBAL_SIZE, GLOBAL_SIZE), 10.0 * image + view) for view in range(2)
            ],
            "local_crops": [
                torch.full((3, LOCAL_SIZE, LOCAL_SIZE), 1000.0 + 10 * image + view) for view in range(n_local)
            ],
        }
        for image in range(batch_size)
    ]


def collate(
    samples: list[dict], seed: int = 0, mask_probability: float = 0.5, generator=None, **options
) -> dict:
    rng = random.Random(seed)
    if generator is None:
        generator = MaskingGenerator(GRID, official_max_num_patches(224, 14), rng=rng)
    return collate_crops_and_masks(
        samples,
        mask_ratio_min_max=RATIOS,
        mask_probability=mask_probability,
        n_tokens=N_TOKENS,
        mask_generator=generator,
        rng=rng,
        **options,
    )


def first_cells_generator(target: int) -> np.ndarray:
    """A stand-in generator that masks exactly `target` cells, so the drawn targets are visible."""
    mask = np.zeros(N_TOKENS, dtype=bool)
    mask[:target] = True
    return mask.reshape(GRID)


def test_crops_are_stacked_crop_major():
    batch_size, n_local = 3, 4
    batch = collate(labelled_samples(batch_size, n_local))
    globals_ = batch["collated_global_crops"]
    locals_ = batch["collated_local_crops"]
    assert globals_.shape == (2 * batch_size, 3, GLOBAL_SIZE, GLOBAL_SIZE) and globals_.dtype == torch.float32
    assert locals_.shape == (n_local * batch_size, 3, LOCAL_SIZE, LOCAL_SIZE)
    for view in range(2):
        for image in range(batch_size):
            assert (globals_[view * batch_size + image] == 10 * image + view).all()
    for view in range(n_local):
        for image in range(batch_size):
            assert (locals_[view * batch_size + image] == 1000 + 10 * image + view).all()


def test_crops_are_cast_and_no_locals_gives_an_empty_tensor():
    batch = collate(labelled_samples(2, 0), dtype=torch.float16, local_crops_size=98)
    assert batch["collated_global_crops"].dtype == torch.float16
    assert batch["collated_local_crops"].shape == (0, 3, 98, 98)
    assert batch["collated_local_crops"].dtype == torch.float16


@pytest.mark.parametrize(("batch_size", "upperbound"), [(32, 2496), (12, 967), (64, 4941)])
def test_mask_count_and_upperbound_follow_the_recipe(batch_size, upperbound):
    batch = collate(labelled_samples(batch_size, 0))
    masks = batch["collated_masks"]
    n_masked = int(2 * batch_size * 0.5)
    assert masks.shape == (2 * batch_size, N_TOKENS) and masks.dtype == torch.bool
    assert int((masks.sum(dim=1) > 0).sum()) == n_masked
    # upperbound = sum_i int(N * (low + (high - low) * (i + 1) / n)), written out in float64
    low, high = RATIOS
    closed_form = sum(int(N_TOKENS * (low + (high - low) * (i + 1) / n_masked)) for i in range(n_masked))
    assert batch["upperbound"] == closed_form == upperbound
    assert isinstance(batch["upperbound"], int)
    assert int(masks.sum()) <= batch["upperbound"]


def test_targets_are_stratified_over_the_ratio_range():
    batch_size = 8
    batch = collate(labelled_samples(batch_size, 0), seed=5, generator=first_cells_generator)
    counts = sorted(int(c) for c in batch["collated_masks"].sum(dim=1) if c > 0)
    n_masked = batch_size  # int(2B * 0.5)
    low, high = RATIOS
    for index, count in enumerate(counts):
        stratum_low = N_TOKENS * (low + (high - low) * index / n_masked)
        stratum_high = N_TOKENS * (low + (high - low) * (index + 1) / n_masked)
        assert int(stratum_low) <= count <= int(stratum_high)


def test_mask_indices_weights_and_count_are_consistent_with_the_masks():
    batch = collate(labelled_samples(16, 0), seed=3)
    masks = batch["collated_masks"].numpy()
    expected_indices = [
        row * N_TOKENS + col for row in range(len(masks)) for col in range(N_TOKENS) if masks[row, col]
    ]
    assert batch["mask_indices_list"].tolist() == expected_indices
    assert batch["mask_indices_list"].dtype == torch.long
    assert batch["n_masked_patches"].tolist() == [len(expected_indices)]
    assert batch["n_masked_patches"].dtype == torch.long
    expected_weights = [
        1 / masks[row].sum() for row in range(len(masks)) for col in range(N_TOKENS) if masks[row, col]
    ]
    assert batch["masks_weight"].dtype == torch.float32
    np.testing.assert_allclose(batch["masks_weight"].numpy(), expected_weights, rtol=1e-6)
    masked_images = int((masks.sum(axis=1) > 0).sum())
    assert float(batch["masks_weight"].sum()) == pytest.approx(masked_images, rel=1e-5)


def test_zero_mask_probability_masks_nothing():
    batch = collate(labelled_samples(4, 0), mask_probability=0.0)
    assert not batch["collated_masks"].any()
    assert batch["upperbound"] == 0
    assert batch["mask_indices_list"].numel() == 0 and batch["masks_weight"].numel() == 0
    assert batch["n_masked_patches"].tolist() == [0]


def test_which_crop_is_masked_is_shuffled_evenly():
    n_seeds, batch_size = 400, 2
    masked_rows = np.zeros(2 * batch_size)
    for seed in range(n_seeds):
        batch = collate(labelled_samples(batch_size, 0), seed=seed, generator=first_cells_generator)
        masked_rows += batch["collated_masks"].any(dim=1).numpy()
    # Each of the 4 crops is masked with probability 2/4; 5 standard deviations of the frequency.
    tolerance = 5 * np.sqrt(0.25 / n_seeds)
    np.testing.assert_allclose(masked_rows / n_seeds, 0.5, atol=tolerance)


def test_same_seed_same_batch():
    first = collate(labelled_samples(8, 1), seed=11)
    second = collate(labelled_samples(8, 1), seed=11)
    assert torch.equal(first["collated_masks"], second["collated_masks"])
    assert torch.equal(first["masks_weight"], second["masks_weight"])
