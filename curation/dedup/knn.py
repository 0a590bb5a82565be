"""Cosine k-NN self-search with Faiss, reduced to the edges of a duplicate graph.

    unit vectors [N, d] --index (flat: exact | IVF: approximate)--> k+1 neighbours of every row
      --drop self, keep cosine > threshold, one (i < j) per undirected pair--> edges (i, j, cosine)

Vectors are L2-normalised, so inner product is cosine. An edge is kept when either end has the other
among its k nearest (the paper's k-NN graph). Each kept edge's cosine is recomputed from the vectors,
so flat and IVF searches report the same number for the same pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

from pipelines.config import IndexKind

# Faiss's guidance: sqrt(N) to 16 sqrt(N) lists, and at least 39 training points per list.
IVF_LISTS_PER_SQRT_ROWS = 4
IVF_MIN_POINTS_PER_LIST = 39
# Why: k-means on this many points per list gives stable cells; more only slows training.
IVF_TRAIN_POINTS_PER_LIST = 256
# Copies sit very close to each other, but near a cell border; probing a few cells finds them.
DEFAULT_IVF_NPROBE = 32
# Queries per search call: bounds the [batch, k] result arrays, whatever N is.
SEARCH_BATCH_ROWS = 65_536
TRAIN_SAMPLE_SEED = 0


@dataclass(frozen=True, slots=True)
class Edges:
    """Undirected edges of the duplicate graph, i < j, sorted by (i, j)."""

    sources: np.ndarray  # int64
    targets: np.ndarray  # int64
    similarity: np.ndarray  # float32 cosine

    def __len__(self) -> int:
        return len(self.sources)


def choose_index(num_rows: int, index: IndexKind, ivf_min_rows: int) -> str:
    """`flat` or `ivf`: auto means exact below `ivf_min_rows` and IVF from there up."""
    if index != "auto":
        return index
    return "ivf" if num_rows >= ivf_min_rows else "flat"


def ivf_lists(num_rows: int) -> int:
    by_rows = IVF_LISTS_PER_SQRT_ROWS * math.isqrt(num_rows)
    return max(1, min(by_rows, num_rows // IVF_MIN_POINTS_PER_LIST))


def build_index(vectors: np.ndarray, kind: str, nprobe: int = DEFAULT_IVF_NPROBE) -> faiss.Index:
    dim = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        nlist = ivf_lists(len(vectors))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        train_rows = min(len(vectors), nlist * IVF_TRAIN_POINTS_PER_LIST)
        sample = np.random.default_rng(TRAIN_SAMPLE_SEED).choice(len(vectors), train_rows, replace=False)
        index.train(vectors[np.sort(sample)])
        index.nprobe = min(nprobe, nlist)
    else:
        raise ValueError(f"index must be 'flat' or 'ivf', got {kind!r}")
    index.add(vectors)
    return index


def knn_edges(
    vectors: np.ndarray,
    num_neighbours: int,
    threshold: float,
    index: IndexKind = "auto",
    ivf_min_rows: int = 200_000,
    nprobe: int = DEFAULT_IVF_NPROBE,
) -> Edges:
    """Edges between rows of `vectors` (unit length) that are k-NN of each other with cosine > threshold.

    Args:
        vectors: [N, d] L2-normalised rows.
        num_neighbours: k, neighbours searched per row (not counting the row itself).
        threshold: Edges need a cosine strictly above this.
        index: `flat`, `ivf`, or `auto` (see `choose_index`).
        ivf_min_rows: Where `auto` switches from exact to IVF search.
        nprobe: IVF cells searched per query; the number of lists searches exhaustively.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    num_rows = len(vectors)
    empty = Edges(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if num_rows < 2:
        return empty
    searcher = build_index(vectors, choose_index(num_rows, index, ivf_min_rows), nprobe)
    k = min(num_neighbours + 1, num_rows)  # +1: each row finds itself first
    pairs = []
    for start in range(0, num_rows, SEARCH_BATCH_ROWS):
        scores, neighbours = searcher.search(vectors[start : start + SEARCH_BATCH_ROWS], k)
        rows = np.arange(start, start + len(scores), dtype=np.int64)[:, None].repeat(k, axis=1)
        # neighbours == -1 marks slots IVF could not fill; self matches are not edges.
        hit = (scores > threshold) & (neighbours >= 0) & (neighbours != rows)
        low = np.minimum(rows[hit], neighbours[hit])
        high = np.maximum(rows[hit], neighbours[hit])
        pairs.append(np.stack([low, high], axis=1))
    unique = np.unique(np.concatenate(pairs), axis=0)
    similarity = np.einsum("ij,ij->i", vectors[unique[:, 0]], vectors[unique[:, 1]])
    keep = similarity > threshold  # the recomputed cosine decides pairs that sit on the threshold
    return Edges(unique[keep, 0], unique[keep, 1], similarity[keep].astype(np.float32))


def pool_index(
    pool: np.ndarray, index: IndexKind = "auto", ivf_min_rows: int = 200_000, nprobe: int = DEFAULT_IVF_NPROBE
) -> faiss.Index:
    """An index over `pool` (unit vectors) for `knn_search`; build once, search with many query sets."""
    return build_index(
        np.ascontiguousarray(pool, dtype=np.float32), choose_index(len(pool), index, ivf_min_rows), nprobe
    )


def knn_search(
    searcher: faiss.Index, queries: np.ndarray, num_neighbours: int
) -> tuple[np.ndarray, np.ndarray]:
    """The `num_neighbours` rows of the index (see `pool_index`) nearest to each query by cosine.

    Returns:
        (similarity [Q, k] float32, neighbour [Q, k] int64), best first; k = min(num_neighbours, rows).
        IVF may leave slots it could not fill: neighbour -1.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(num_neighbours, searcher.ntotal)
    if k == 0 or len(queries) == 0:
        return np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64)
    scores, neighbours = [], []
    for start in range(0, len(queries), SEARCH_BATCH_ROWS):
        batch_scores, batch_neighbours = searcher.search(queries[start : start + SEARCH_BATCH_ROWS], k)
        scores.append(batch_scores)
        neighbours.append(batch_neighbours)
    return np.concatenate(scores).astype(np.float32), np.concatenate(neighbours).astype(np.int64)
