"""SSCD's score normalisation: background similarity by hand, and the graph edges it changes."""

from __future__ import annotations

import numpy as np
import pytest

from curation.dedup.normalise import NOT_IN_BACKGROUND, Background
from curation.search.knn import ArrayVectors, build_index, edge_batches


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_bias_is_the_mean_of_background_ranks_two_to_four_without_the_row_itself():
    rng = np.random.default_rng(0)
    vectors = _unit(rng.standard_normal((40, 8)))
    background = Background.sample(ArrayVectors(vectors), 40, seed=0)  # every row
    biases = background.row_bias(ArrayVectors(vectors))
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    ranked = -np.sort(-similarity, axis=1)
    np.testing.assert_allclose(biases, ranked[:, 1:4].mean(axis=1), atol=1e-5)
    # A vector outside the graph leaves out the row named as its own (a copy's original) instead.
    probe = vectors[:3] + 0.01
    own = np.array([0, 1, NOT_IN_BACKGROUND])
    scores = _unit(probe) @ vectors.T
    scores[0, 0] = scores[1, 1] = -np.inf
    expected = (-np.sort(-scores, axis=1))[:, 1:4].mean(axis=1)
    np.testing.assert_allclose(background.bias(_unit(probe), own), expected, atol=1e-5)


def test_a_small_background_gives_no_bias_rather_than_a_made_up_one():
    vectors = _unit(np.array([[1.0, 0.0], [0.0, 1.0]]))
    background = Background.sample(ArrayVectors(vectors), 2, seed=0)
    # Each row has one other background row: the skipped nearest one, so nothing to average.
    assert background.row_bias(ArrayVectors(vectors)).tolist() == [0.0, 0.0]


def test_a_pair_in_a_dense_region_needs_a_wider_margin_than_a_pair_of_rare_images():
    # Two rows at cosine 0.95 in an empty region, and two at 0.95 amid ten look-alikes at 0.9.
    rare = _unit(np.array([[1.0, 0.0, 0.0], [0.95, np.sqrt(1 - 0.95**2), 0.0]]))
    base = np.array([0.0, 0.0, 1.0])
    crowd = _unit(
        np.stack([base + 0.33 * np.array([np.cos(a), np.sin(a), 0.0]) for a in np.linspace(0, 6, 12)])
    )
    vectors = np.concatenate([rare, crowd]).astype(np.float32)
    rows = ArrayVectors(vectors)
    bias = Background.sample(rows, len(vectors), seed=0).row_bias(rows)
    searcher = build_index(vectors, "flat")
    raw = {
        (int(a), int(b))
        for batch in edge_batches(rows, searcher, 4, 0.9)
        for a, b in zip(batch.sources, batch.targets, strict=True)
    }
    normalised = {
        (int(a), int(b))
        for batch in edge_batches(rows, searcher, 4, 0.1, bias)
        for a, b in zip(batch.sources, batch.targets, strict=True)
    }
    assert (0, 1) in raw and any(a >= 2 for a, _ in raw)  # raw cosine joins the crowd too
    assert normalised == {(0, 1)}
    assert bias[0] < 0.5 < bias[2] == pytest.approx(bias[5], abs=0.05)
