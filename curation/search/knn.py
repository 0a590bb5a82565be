"""Cosine k-NN self-search with Faiss, reduced to the edges of a duplicate graph.

    unit vectors [N, d] --index (flat: exact | IVF: approximate)--> k+1 neighbours of every row
      --drop self, keep cosine > threshold, one (i < j) per undirected pair--> edges (i, j, cosine)

Vectors are L2-normalised, so inner product is cosine. An edge is kept when either end has the other
among its k nearest (the paper's k-NN graph). `edge_batches` yields the edges one query batch at a time
(the stages feed them to a union-find and never hold the edge list); `searched_edges` gathers them and
recomputes each kept edge's cosine from the vectors, so flat and IVF searches report the same number for
the same pair. The searches take any `Searcher`: a Faiss index built here, or
`curation.search.sharded.ShardedIndex` (shards on executor workers). Indexes fill from any `VectorSource`:
an array in memory, or rows read a block at a time from a manifest's parts
(`curation.vector_parts.StoredVectors`).

Ties: rows with equal scores rank by row id, the higher first, the order Faiss lists them in
(`ranked_search`). Which of several rows tied at the k-th place a Faiss heap keeps depends on the
order it meets them in, so on how the rows are laid out; searching one row more tells whether a tie
crosses the cut, and only then is the search widened: one index and any number of shards give the
same rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import faiss
import numpy as np

from curation.search.config import DEFAULT_SQ_BITS, SearchConfig
from pipelines.validation import require

# Faiss's guidance: sqrt(N) to 16 sqrt(N) lists, and at least 39 training points per list.
IVF_LISTS_PER_SQRT_ROWS = 4
IVF_MIN_POINTS_PER_LIST = 39
# Why 64 (benchmarks/ivf_search.py): recall@4 is the same as with Faiss's default cap of 256 (0.9960 vs
# 0.9946 at 500,000 rows, 32 probes) and the index builds in half the time (12.6 vs 25.1 s).
IVF_TRAIN_POINTS_PER_LIST = 64
# Probes when the config leaves them open: this share of the lists, so a query scans the same share of
# the database, and IVF keeps the same speed-up over exact search, at every pool size (a fixed nprobe
# gets slower against exact search as the lists shrink). Why 1% (benchmarks/ivf_search.py, anisotropic
# overlapping clusters, 2 threads): recall@4 0.990 / 0.993 / 0.993 at 0.9% / 0.85% / 0.8% of the lists
# on 200,000 / 500,000 / 1M rows, 10-14x faster than exact; 0.4% drops to 0.975.
IVF_PROBED_SHARE = 0.01
IVF_MIN_PROBES = 8
# IVF-SQ codes by bits per dimension (each dimension's range trained on the sample).
SCALAR_QUANTIZERS = {
    4: faiss.ScalarQuantizer.QT_4bit,
    6: faiss.ScalarQuantizer.QT_6bit,
    8: faiss.ScalarQuantizer.QT_8bit,
}
# Result slots (queries x k) per graph search call: about 12 MB a copy of the batch's results.
GRAPH_BATCH_SLOTS = 1 << 20
# Queries per search call: bounds the [batch, k] result arrays, whatever N is.
SEARCH_BATCH_ROWS = 65_536
TRAIN_SAMPLE_SEED = 0
# In-memory searches default to the stages' defaults: exact below `ivf_min_rows` rows, IVF above.
DEFAULT_SEARCH = SearchConfig()


class Searcher(Protocol):
    """What the searches here need of an index; `faiss.Index` has it."""

    @property
    def ntotal(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k] float32, row ids [Q, k] int64), best first; slots it cannot fill: id -1."""
        ...


class VectorSource(Protocol):
    """[len, dim] unit float32 rows, read a block at a time (so an index fills without a second copy)."""

    @property
    def dim(self) -> int: ...

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 as a [stop - start, dim] float32 array."""
        ...

    def read_rows(self, positions: np.ndarray) -> np.ndarray:
        """The rows at sorted `positions` as a [len(positions), dim] float32 array."""
        ...

    def part(self, start: int, stop: int) -> VectorSource:
        """Rows start..stop-1 as a source of their own (what one index shard's worker reads)."""
        ...


@dataclass(frozen=True, slots=True)
class ArrayVectors:
    """A `VectorSource` over an array already in memory."""

    vectors: np.ndarray

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def __len__(self) -> int:
        return len(self.vectors)

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.ascontiguousarray(self.vectors[start:stop], dtype=np.float32)

    def read_rows(self, positions: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.vectors[positions], dtype=np.float32)

    def part(self, start: int, stop: int) -> ArrayVectors:
        return ArrayVectors(self.vectors[start:stop])


def vector_source(database: np.ndarray | VectorSource) -> VectorSource:
    """`database` as a VectorSource (an array is wrapped)."""
    return ArrayVectors(database) if isinstance(database, np.ndarray) else database


@dataclass(frozen=True, slots=True)
class Edges:
    """Undirected edges of the duplicate graph, i < j, sorted by (i, j)."""

    sources: np.ndarray  # int64
    targets: np.ndarray  # int64
    similarity: np.ndarray  # float32 cosine

    def __len__(self) -> int:
        return len(self.sources)


def ivf_lists(num_rows: int) -> int:
    by_rows = IVF_LISTS_PER_SQRT_ROWS * math.isqrt(num_rows)
    return max(1, min(by_rows, num_rows // IVF_MIN_POINTS_PER_LIST))


def ivf_probes(nlist: int, nprobe: int | None = None) -> int:
    """Lists an IVF index of `nlist` lists searches per query: `nprobe`, or IVF_PROBED_SHARE of them."""
    chosen = nprobe if nprobe is not None else max(IVF_MIN_PROBES, math.ceil(nlist * IVF_PROBED_SHARE))
    return min(chosen, nlist)


def faiss_gpus(use_gpu: bool) -> int:
    """How many GPUs an index goes to: all that Faiss sees when asked (none with faiss-cpu), else 0."""
    return faiss.get_num_gpus() if use_gpu else 0


def on_gpus(index: faiss.Index, use_gpu: bool) -> faiss.Index:
    """`index` copied to every GPU Faiss sees (queries split between the copies), or `index` itself."""
    if faiss_gpus(use_gpu) == 0:
        return index
    return faiss.index_cpu_to_all_gpus(index)


def nearest_centroid(
    points: np.ndarray, centroids: np.ndarray, use_gpu: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(cluster [n] int64, cosine [n] float32) of each row's nearest centroid (a k-means assignment)."""
    index = on_gpus(faiss.IndexFlatIP(centroids.shape[1]), use_gpu)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    similarity, nearest = index.search(np.ascontiguousarray(points, dtype=np.float32), 1)
    return nearest[:, 0].astype(np.int64), similarity[:, 0]


def build_index(
    database: np.ndarray | VectorSource,
    kind: str,
    nprobe: int | None = None,
    use_gpu: bool = False,
    sq_bits: int = DEFAULT_SQ_BITS,
    lists: int | None = None,
) -> faiss.Index:
    """A flat, IVF or IVF-SQ inner-product index over `database`, filled `SEARCH_BATCH_ROWS` rows at once.

    IVF lists (and the scalar quantiser's ranges) train on a seeded sample of rows; only the sample and
    one block are ever read at once. With `use_gpu` and GPUs present, lists train and the index fills
    and searches on them.
    """
    source = vector_source(database)
    num_rows, dim = len(source), source.dim
    if kind not in ("flat", "ivf", "ivfsq"):
        raise ValueError(f"index must be 'flat', 'ivf' or 'ivfsq', got {kind!r}")
    if kind == "flat" or num_rows == 0:  # no rows to train IVF lists on
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = min(lists, num_rows) if lists is not None else ivf_lists(num_rows)
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            codes = SCALAR_QUANTIZERS[sq_bits]
            index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, codes, faiss.METRIC_INNER_PRODUCT)
        # The lists' k-means on the GPUs. Faiss holds only a pointer to it: this name keeps it alive while
        # training, and the pointer is cleared before the name goes.
        gpu_clustering = on_gpus(faiss.IndexFlatIP(dim), use_gpu) if faiss_gpus(use_gpu) else None
        index.clustering_index = gpu_clustering
        train_rows = min(num_rows, nlist * IVF_TRAIN_POINTS_PER_LIST)
        sample = np.random.default_rng(TRAIN_SAMPLE_SEED).choice(num_rows, train_rows, replace=False)
        index.train(source.read_rows(np.sort(sample)))
        index.clustering_index = None
        index.nprobe = ivf_probes(nlist, nprobe)  # a GPU copy takes its nprobe from here
    return fill_index(on_gpus(index, use_gpu), source)


def fill_index(index: faiss.Index, source: VectorSource) -> faiss.Index:
    """Adds every row of `source` to a trained `index`, `SEARCH_BATCH_ROWS` rows at a time (an IVF index in
    this process: into lists sized once, `fill_presized`)."""
    # Not on a GPU copy, whose lists live on the device.
    if isinstance(index, faiss.IndexIVF):
        return fill_presized(index, source)
    for start, stop in row_blocks(len(source)):
        index.add(source.read(start, stop))
    return index


def fill_presized(index: faiss.IndexIVF, source: VectorSource) -> faiss.IndexIVF:
    """`index.add` of every row, each list's storage allocated once at its final size.

    Why two passes: a list grown by appends (`index.add`) reallocates geometrically, so its storage ends up
    at 1.3x its codes (2M rows, 4-bit codes) to 1.6x (20M rows: 2.2 GB for 1.37 GB); the price is reading
    the rows twice. `index` must be empty (row i gets id i). The first pass assigns every row its list
    (4 bytes a row, the only thing held besides the index); each list is then reserved at its count, and
    the second pass adds the rows to the lists the first pass chose, the same lists `index.add` chooses:
    the same index.
    """
    require(index.ntotal == 0, f"fill_presized fills an empty index; this one holds {index.ntotal} rows")
    lists = np.empty(len(source), dtype=np.int32)
    for start, stop in row_blocks(len(source)):
        lists[start:stop] = index.quantizer.assign(source.read(start, stop), 1)[:, 0]
    storage = faiss.downcast_InvertedLists(index.invlists)
    for list_no, size in enumerate(np.bincount(lists, minlength=index.nlist).tolist()):
        # A vector resized down keeps its capacity: the appends below never reallocate.
        storage.resize(list_no, size)
        storage.resize(list_no, 0)
    for start, stop in row_blocks(len(source)):
        vectors = np.ascontiguousarray(source.read(start, stop), dtype=np.float32)
        ids = np.arange(start, stop, dtype=np.int64)
        assigned = lists[start:stop].astype(np.int64)
        index.add_core(stop - start, faiss.swig_ptr(vectors), faiss.swig_ptr(ids), faiss.swig_ptr(assigned))
    return index


def row_blocks(num_rows: int) -> Iterator[tuple[int, int]]:
    """`(start, stop)` of each `SEARCH_BATCH_ROWS`-row block of `num_rows` rows."""
    for start in range(0, num_rows, SEARCH_BATCH_ROWS):
        yield start, min(num_rows, start + SEARCH_BATCH_ROWS)


def knn_edges(
    vectors: np.ndarray,
    num_neighbours: int,
    threshold: float,
    search: SearchConfig = DEFAULT_SEARCH,
) -> Edges:
    """Edges between rows of `vectors` (unit length) that are k-NN of each other with cosine > threshold.

    Args:
        vectors: [N, d] L2-normalised rows.
        num_neighbours: k, neighbours searched per row (not counting the row itself).
        threshold: Edges need a cosine strictly above this.
        search: The index (one, in this process: `search.shards` is not used here).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(vectors) < 2:
        return _no_edges()
    kind = search.kind_for(len(vectors))
    searcher = build_index(vectors, kind, search.ivf_nprobe, search.use_gpu, search.sq_bits, search.ivf_lists)
    return searched_edges(vectors, searcher, num_neighbours, threshold)


def searched_edges(vectors: np.ndarray, searcher: Searcher, num_neighbours: int, threshold: float) -> Edges:
    """`knn_edges` with the index given: `searcher` holds exactly the rows of `vectors`, in order."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    batches = list(edge_batches(ArrayVectors(vectors), searcher, num_neighbours, threshold))
    if not batches:
        return _no_edges()
    unique = np.unique(np.concatenate([np.stack([b.sources, b.targets], axis=1) for b in batches]), axis=0)
    similarity = np.einsum("ij,ij->i", vectors[unique[:, 0]], vectors[unique[:, 1]])
    keep = similarity > threshold  # the recomputed cosine decides pairs that sit on the threshold
    return Edges(unique[keep, 0], unique[keep, 1], similarity[keep].astype(np.float32))


def edge_batches(
    queries: VectorSource,
    searcher: Searcher,
    num_neighbours: int,
    threshold: float,
    bias: np.ndarray | None = None,
) -> Iterator[Edges]:
    """The graph's edges, one batch of query rows at a time (`searcher` holds exactly the rows of
    `queries`, in order).

    Each batch's edges are distinct and sorted, scored as the index scored them (cosine > threshold). With
    `bias` (one value per row), a pair's score is its cosine minus the mean of its two rows' biases (SSCD's
    score normalisation); the edges keep their cosine. An edge whose ends find each other from different
    batches comes once from each: a union-find does not mind, and `EdgeTally` counts it once.
    """
    num_rows = len(queries)
    if num_rows < 2:
        return
    k = min(num_neighbours + 1, num_rows)  # +1: each row finds itself first
    # Why fewer queries for a wide k: a batch's results and their sort are a few copies of [batch, k].
    batch_rows = max(1, min(SEARCH_BATCH_ROWS, GRAPH_BATCH_SLOTS // k))
    for start in range(0, num_rows, batch_rows):
        stop = min(num_rows, start + batch_rows)
        scores, neighbours = ranked_search(searcher, queries.read(start, stop), k)
        rows = np.arange(start, stop, dtype=np.int64)[:, None].repeat(k, axis=1)
        scored = scores if bias is None else scores - (bias[rows] + bias[np.maximum(neighbours, 0)]) / 2
        # neighbours == -1 marks slots IVF could not fill; self matches are not edges.
        hit = (scored > threshold) & (neighbours >= 0) & (neighbours != rows)
        low = np.minimum(rows[hit], neighbours[hit])
        high = np.maximum(rows[hit], neighbours[hit])
        pairs, first = np.unique(np.stack([low, high], axis=1), axis=0, return_index=True)
        yield Edges(pairs[:, 0], pairs[:, 1], scores[hit][first].astype(np.float32))


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


def knn_search(searcher: Searcher, queries: np.ndarray, num_neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """The `num_neighbours` rows of the index nearest to each query by cosine.

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
