"""Cosine k-NN self-search with Faiss, reduced to the edges of a duplicate graph.

    unit vectors [N, d] --index (flat: exact | IVF: approximate)--> k+1 neighbours of every row
      --drop self, keep cosine > threshold, one (i < j) per undirected pair--> edges (i, j, cosine)

Vectors are L2-normalised, so inner product is cosine. An edge is kept when either end has the other
among its k nearest (the paper's k-NN graph). Each kept edge's cosine is recomputed from the vectors,
so flat and IVF searches report the same number for the same pair. The searches take any `Searcher`:
a Faiss index built here, or `curation.sharded_knn.ShardedIndex` (shards on executor workers).

Ties: rows with equal scores rank by row id, the higher first, the order Faiss lists them in
(`ranked_search`). Which of several rows tied at the k-th place a Faiss heap keeps depends on the
order it meets them in, so on how the rows are laid out; searching one row more tells whether a tie
crosses the cut, and only then is the search widened: one index and any number of shards give the
same rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

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


class Searcher(Protocol):
    """What the searches here need of an index; `faiss.Index` has it."""

    @property
    def ntotal(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k] float32, row ids [Q, k] int64), best first; slots it cannot fill: id -1."""
        ...


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
    if kind == "flat" or (kind == "ivf" and len(vectors) == 0):  # no rows to train IVF lists on
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
    if len(vectors) < 2:
        return _no_edges()
    searcher = build_index(vectors, choose_index(len(vectors), index, ivf_min_rows), nprobe)
    return searched_edges(vectors, searcher, num_neighbours, threshold)


def searched_edges(vectors: np.ndarray, searcher: Searcher, num_neighbours: int, threshold: float) -> Edges:
    """`knn_edges` with the index given: `searcher` holds exactly the rows of `vectors`, in order."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    num_rows = len(vectors)
    if num_rows < 2:
        return _no_edges()
    k = min(num_neighbours + 1, num_rows)  # +1: each row finds itself first
    pairs = []
    for start in range(0, num_rows, SEARCH_BATCH_ROWS):
        scores, neighbours = ranked_search(searcher, vectors[start : start + SEARCH_BATCH_ROWS], k)
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


def ranked_search(
    searcher: Searcher, queries: np.ndarray, k: int, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The `k` best rows of `searcher` per query by (score desc, row id desc); 1 <= k <= searcher.ntotal.

    Searches `width` rows (default k + 1). Where the last of them scores as high as the k-th, rows of
    that score may lie past the cut: those queries are searched again, twice as wide.

    Returns:
        (scores [Q, k] float32, rows [Q, k] int64); slots an IVF index cannot fill: row -1, last.
    """
    width = min(k + 1 if width is None else width, searcher.ntotal)
    scores, rows = searcher.search(queries, width)
    order = np.lexsort((-rows, -scores), axis=-1)[:, :k]
    best_scores = np.take_along_axis(scores, order, axis=1).astype(np.float32)
    best_rows = np.take_along_axis(rows, order, axis=1).astype(np.int64)
    if width < searcher.ntotal:
        # An index returns its rows best first, so the last is the lowest score it returned.
        open_rows = np.flatnonzero((scores[:, -1] == best_scores[:, -1]) & (rows[:, -1] >= 0))
        if len(open_rows):
            wider = ranked_search(searcher, queries[open_rows], k, 2 * width)
            best_scores[open_rows], best_rows[open_rows] = wider
    return best_scores, best_rows


def _no_edges() -> Edges:
    return Edges(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))


def pool_index(
    pool: np.ndarray, index: IndexKind = "auto", ivf_min_rows: int = 200_000, nprobe: int = DEFAULT_IVF_NPROBE
) -> faiss.Index:
    """An index over `pool` (unit vectors) for `knn_search`; build once, search with many query sets."""
    return build_index(
        np.ascontiguousarray(pool, dtype=np.float32), choose_index(len(pool), index, ivf_min_rows), nprobe
    )


def knn_search(searcher: Searcher, queries: np.ndarray, num_neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """The `num_neighbours` rows of the index (see `pool_index`) nearest to each query by cosine.

    Returns:
        (similarity [Q, k] float32, neighbour [Q, k] int64), best first, equal scores by row id (see
        `ranked_search`); k = min(num_neighbours, rows). IVF may leave slots it could not fill: -1.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(num_neighbours, searcher.ntotal)
    if k == 0 or len(queries) == 0:
        return np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64)
    scores, neighbours = [], []
    for start in range(0, len(queries), SEARCH_BATCH_ROWS):
        batch_scores, batch_neighbours = ranked_search(
            searcher, queries[start : start + SEARCH_BATCH_ROWS], k
        )
        scores.append(batch_scores)
        neighbours.append(batch_neighbours)
    return np.concatenate(scores), np.concatenate(neighbours)
