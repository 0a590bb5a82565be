"""Hierarchical k-means nests its levels; balanced sampling splits a budget evenly down the tree."""

from __future__ import annotations

import numpy as np
import pytest

from curation.hierarchy import Level, balanced_sample, hierarchical_kmeans, split_budget

# A long-tailed mixture of well-separated concepts (the sizes a crawl's concepts might have, scaled down).
CONCEPT_SIZES = (2000, 1000, 500, 250, 120, 60, 40, 30)
DIM = 32
NOISE = 0.05
LEVELS = (
    Level(clusters=32, resampling_steps=3, points_per_cluster=5),
    Level(clusters=8, resampling_steps=3, points_per_cluster=2),
)
TARGET = 240  # 30 per top-level cluster: every concept holds at least 30 rows


@pytest.fixture(scope="module")
def mixture() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = np.linalg.qr(rng.normal(size=(DIM, DIM)))[0][: len(CONCEPT_SIZES)]  # orthogonal concepts
    concept = np.repeat(np.arange(len(CONCEPT_SIZES)), CONCEPT_SIZES)
    vectors = centres[concept] + NOISE * rng.normal(size=(len(concept), DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32), concept


@pytest.fixture(scope="module")
def tree(mixture):
    return hierarchical_kmeans(mixture[0], LEVELS, seed=0)


def test_split_budget_fills_small_children_and_evens_out_the_rest():
    shares = split_budget(10, np.array([1, 5, 100]), np.random.default_rng(0))
    assert shares.sum() == 10 and shares[0] == 1
    assert sorted(shares[1:].tolist()) == [4, 5]  # 4 each, the one left over to one of the two
    np.testing.assert_array_equal(split_budget(50, np.array([3, 4]), np.random.default_rng(0)), [3, 4])


def test_levels_nest_each_lower_cluster_inside_one_upper_cluster(tree, mixture):
    paths = tree.paths()
    assert paths.shape == (len(mixture[0]), len(LEVELS))
    assert [len(centroids) for centroids in tree.centroids] == [level.clusters for level in LEVELS]
    for leaf in np.unique(paths[:, 0]):
        assert len(np.unique(paths[paths[:, 0] == leaf, 1])) == 1


def test_balanced_sampling_splits_the_target_evenly_over_the_top_clusters(tree):
    picked = balanced_sample(tree, TARGET, seed=0)
    assert len(picked) == TARGET and len(np.unique(picked)) == TARGET
    per_top_cluster = np.bincount(tree.paths()[picked, -1], minlength=len(tree.centroids[-1]))
    np.testing.assert_array_equal(per_top_cluster, TARGET // len(tree.centroids[-1]))


def entropy(counts: np.ndarray) -> float:
    shares = counts[counts > 0] / counts.sum()
    return float(-(shares * np.log(shares)).sum())


def test_balanced_sampling_brings_the_concepts_closer_to_even_than_to_the_pool(tree, mixture):
    concept = mixture[1]
    balanced = np.bincount(concept[balanced_sample(tree, TARGET, seed=0)], minlength=len(CONCEPT_SIZES))
    # A random sample follows the pool (entropy of the sizes); a perfect balance is log(concepts). The top
    # clusters need not be the concepts, so the test asks for past halfway, not for equality.
    pool = entropy(np.array(CONCEPT_SIZES))
    assert entropy(balanced) >= (pool + np.log(len(CONCEPT_SIZES))) / 2
    random_rows = np.random.default_rng(0).choice(len(concept), TARGET, replace=False)
    assert balanced.min() > np.bincount(concept[random_rows], minlength=len(CONCEPT_SIZES)).min()


def test_closest_leaf_pick_takes_the_rows_nearest_each_leaf_centroid(tree):
    picked = balanced_sample(tree, TARGET, seed=0, leaf_pick="closest")
    leaves = tree.paths()[:, 0]
    for leaf in np.unique(leaves[picked]):
        members = np.flatnonzero(leaves == leaf)
        taken = np.intersect1d(picked, members)
        assert tree.similarity[taken].min() >= np.delete(tree.similarity, taken)[
            np.isin(np.delete(np.arange(len(leaves)), taken), members)
        ].max(initial=-1.0)
