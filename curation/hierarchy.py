"""Hierarchical k-means with resampling, and balanced sampling down its tree (Vo et al. 2024, the curation
behind DINOv3's LVD-1689M): the algorithm on arrays in memory. The `balance` stage (curation/balance.py)
runs it on a sample of the pool and streams every row's assignment and the pick over manifest parts.

    vectors [N, d] (unit rows) --level 1: k-means, then `resampling_steps` times: keep the s rows nearest
      each centroid, k-means again on those alone, reassign every row--> centroids_1, assignment_1 [N]
    centroids_{t-1} --level t: the same on the previous level's centroids--> centroids_t, assignment_t
    tree + target T --split T evenly over the top clusters (a small cluster is taken whole and its
      surplus goes to the others), recursively down the levels (level_budgets); in a leaf, the rows of
      highest priority: a uniform draw (random) or the cosine to the centroid (closest) (top_per_leaf)
      --> row indices of the balanced sample

Why levels: k-means centroids crowd where data is dense (density^(d/(d+2))), so one level still gives
frequent concepts many clusters; clustering the centroids again flattens that, and resampling pulls
centroids towards even coverage. Departures from the reference code: cosine (spherical) k-means on
lvd's unit embeddings instead of squared L2 on raw ones, and Faiss's random init instead of k-means++.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np

from curation.search.knn import faiss_gpus, nearest_centroid
from pipelines.validation import require

LeafPick = Literal["random", "closest"]
KMEANS_ITERATIONS = 20
# Seeds of level t's k-means runs start at seed + t * this: apart from the level's resampling seeds.
LEVEL_SEED_STRIDE = 1000


@dataclass(frozen=True, kw_only=True, slots=True)
class Level:
    """One level of the tree: `clusters` centroids, refit `resampling_steps` times on the
    `points_per_cluster` rows nearest each centroid (none when that is 1 or less)."""

    clusters: int
    resampling_steps: int = 10
    points_per_cluster: int = 10

    def __post_init__(self) -> None:
        require(self.clusters >= 1, f"clusters must be >= 1, got {self.clusters}")
        require(self.resampling_steps >= 0, f"resampling_steps must be >= 0, got {self.resampling_steps}")
        require(
            self.points_per_cluster >= 1, f"points_per_cluster must be >= 1, got {self.points_per_cluster}"
        )


@dataclass(frozen=True, slots=True)
class ClusterTree:
    """Per level t (0 = the first): centroids [k_t, d], and the cluster of each item one level down
    (level 0: of each vector; level t: of each level t - 1 centroid)."""

    centroids: list[np.ndarray]
    assignments: list[np.ndarray]
    similarity: np.ndarray  # [N] cosine of each vector to its level-0 centroid (the leaves' order)

    def paths(self) -> np.ndarray:
        """[N, levels] int64: each vector's cluster at every level; columns nest by construction."""
        return ancestors(self.assignments[1:], self.assignments[0])


def ancestors(parents: Sequence[np.ndarray], leaves: np.ndarray) -> np.ndarray:
    """[n, levels] the cluster of each of `leaves` at every level (leaf first), from each level's parents."""
    columns = [leaves]
    for parent in parents:
        columns.append(parent[columns[-1]])
    return np.stack(columns, axis=1)


def spherical_kmeans(points: np.ndarray, clusters: int, seed: int, use_gpu: bool = False) -> np.ndarray:
    """[clusters, d] unit centroids of `points` (every row used: no subsampling)."""
    kmeans = faiss.Kmeans(
        points.shape[1],
        clusters,
        niter=KMEANS_ITERATIONS,
        spherical=True,
        seed=seed,
        min_points_per_centroid=1,
        max_points_per_centroid=len(points),
        gpu=faiss_gpus(use_gpu) > 0,
        verbose=False,
    )
    kmeans.train(np.ascontiguousarray(points, dtype=np.float32))
    return kmeans.centroids


def nearest_per_cluster(cluster: np.ndarray, similarity: np.ndarray, count: int) -> np.ndarray:
    """Sorted row indices of the `count` rows nearest their centroid in each cluster (all, if fewer)."""
    order = np.lexsort((-similarity, cluster))  # by cluster, nearest first
    ordered = cluster[order]
    rank = np.arange(len(order)) - np.searchsorted(ordered, ordered)
    return np.sort(order[rank < count])


def resampled_kmeans(
    points: np.ndarray, level: Level, seed: int, use_gpu: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One level: (centroids, cluster of each row, cosine to it)."""
    clusters = min(level.clusters, len(points))
    centroids = spherical_kmeans(points, clusters, seed, use_gpu)
    steps = level.resampling_steps if level.points_per_cluster > 1 else 0
    for step in range(steps):
        cluster, similarity = nearest_centroid(points, centroids, use_gpu)
        kept = nearest_per_cluster(cluster, similarity, level.points_per_cluster)
        centroids = spherical_kmeans(points[kept], clusters, seed + step + 1, use_gpu)
    cluster, similarity = nearest_centroid(points, centroids, use_gpu)
    return centroids, cluster, similarity


def hierarchical_kmeans(
    vectors: np.ndarray, levels: Sequence[Level], seed: int = 0, use_gpu: bool = False
) -> ClusterTree:
    """The tree of `levels` over `vectors` [N, d] (unit rows), each level clustering the one below (on the
    GPUs Faiss sees when `use_gpu`)."""
    require(len(levels) >= 1, "hierarchical_kmeans needs at least one level")
    points = vectors
    centroids, assignments, leaf_similarity = [], [], np.zeros(0, np.float32)
    for depth, level in enumerate(levels):
        level_seed = seed + LEVEL_SEED_STRIDE * depth
        level_centroids, cluster, similarity = resampled_kmeans(points, level, level_seed, use_gpu)
        if depth == 0:
            leaf_similarity = similarity
        centroids.append(level_centroids)
        assignments.append(cluster)
        points = level_centroids
    return ClusterTree(centroids, assignments, leaf_similarity)


def split_budget(budget: int, caps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`budget` split over children with `caps`: everyone gets min(x, cap) for the largest x that fits,
    and what is left goes one each to random children still under their cap. Sums to min(budget, caps
    sum); no child exceeds its cap."""
    caps = np.asarray(caps, dtype=np.int64)
    if caps.sum() <= budget:
        return caps.copy()
    low, high = 0, int(caps.max())
    while low < high:  # the largest x with sum(min(x, caps)) <= budget
        middle = (low + high + 1) // 2
        if np.minimum(middle, caps).sum() <= budget:
            low = middle
        else:
            high = middle - 1
    shares = np.minimum(low, caps)
    open_children = np.flatnonzero(caps > low)
    extra = budget - int(shares.sum())
    shares[rng.choice(open_children, extra, replace=False)] += 1
    return shares


def level_sizes(parents: Sequence[np.ndarray], leaf_sizes: np.ndarray) -> list[np.ndarray]:
    """Rows under every cluster of each level (leaves first), from the leaves' sizes and, per level above,
    the parent of each cluster one level down."""
    sizes = [np.asarray(leaf_sizes, dtype=np.int64)]
    for parent in parents:
        sizes.append(np.bincount(parent, weights=sizes[-1], minlength=int(parent.max()) + 1).astype(np.int64))
    return sizes


def level_budgets(
    parents: Sequence[np.ndarray], sizes: Sequence[np.ndarray], target: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Rows to take under every cluster of each level (leaves first): `target` split evenly over the top
    clusters, then each cluster's share split evenly over its children, down to the leaves."""
    budgets = [split_budget(target, sizes[-1], rng)]
    for level in range(len(parents) - 1, -1, -1):
        children_of = members_by_label(parents[level], len(budgets[0]))
        children_budget = np.zeros_like(sizes[level])
        for parent in np.flatnonzero(budgets[0]):
            children = children_of[parent]
            children_budget[children] = split_budget(int(budgets[0][parent]), sizes[level][children], rng)
        budgets.insert(0, children_budget)
    return budgets


def members_by_label(labels: np.ndarray, num_labels: int) -> list[np.ndarray]:
    """For each label, the ascending positions holding it: one sort, not one scan per label."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_labels + 1))
    return [order[start:stop] for start, stop in itertools.pairwise(bounds)]


def top_per_leaf(
    leaf: np.ndarray, priority: np.ndarray, budgets: np.ndarray, tiebreak: np.ndarray
) -> np.ndarray:
    """Positions of the `budgets[leaf]` rows of highest `priority` in each leaf (ties: lowest `tiebreak`),
    by leaf, highest priority first."""
    order = np.lexsort((tiebreak, -priority, leaf))
    ordered = leaf[order]
    rank = np.arange(len(order)) - np.searchsorted(ordered, ordered)
    return order[rank < budgets[ordered]]


def leaf_priority(leaf_pick: LeafPick, similarity: np.ndarray, draw: np.ndarray) -> np.ndarray:
    """What a leaf keeps first: the rows nearest its centroid (`closest`), or a uniform draw (`random`)."""
    return similarity if leaf_pick == "closest" else draw


def balanced_sample(
    tree: ClusterTree, target: int, seed: int = 0, leaf_pick: LeafPick = "random"
) -> np.ndarray:
    """Sorted row indices of at most `target` vectors, split evenly down the tree (each row at most once)."""
    rng = np.random.default_rng(seed)
    leaves = tree.assignments[0]
    parents = tree.assignments[1:]
    sizes = level_sizes(parents, np.bincount(leaves, minlength=len(tree.centroids[0])))
    budgets = level_budgets(parents, sizes, target, rng)
    priority = leaf_priority(leaf_pick, tree.similarity, rng.random(len(leaves)))
    return np.sort(top_per_leaf(leaves, priority, budgets[0], np.arange(len(leaves))))
