"""The duplicate graph of `copy_dedup` and `decontaminate`, built in bounded memory.

images rows in the graph (global rows in key order: the search's row ids, the same graph whatever the
  part layout) --located_descriptors: by position, or a key merge for a subset--> where each row's
  descriptor lies -->
  `graph_index`: a Faiss index filled a block at a time (one here, or `search.shards` shards on executor
  workers, each reading its own rows), which the stage may probe first (`GraphIndex.neighbours`)
  --`GraphIndex.components`: k-NN of each query block, score > threshold (the cosine, or minus the rows'
  biases when normalised)--> edge batches
  --streamed_components: ComponentLabels (8 bytes a row) + EdgeTally (pairs spilled to local disk)-->
  a label per images row (the smallest row index of its component), the number of distinct edges

Memory: the index (its vectors; the stage never holds a second copy), one query block and its results,
the labels. Never the edge list.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from curation.dedup.components import ComponentLabels
from curation.search import SearchConfig, database_index
from curation.search.knn import SEARCH_BATCH_ROWS, Searcher, VectorSource, edge_batches, knn_search
from curation.vector_parts import StoredVectors, stored_vectors
from pipelines.executor import Executor
from pipelines.partitions import KeyRanges, key_ranges, subset_positions
from pipelines.validation import require

DESCRIPTOR_COLUMN = "descriptor"
# The paper's copy-detection k-NN graph: 64 neighbours per image.
PAPER_GRAPH_NEIGHBOURS = 64
# A probe that finds too few allowed neighbours searches this many times wider.
NEIGHBOUR_WIDENING = 4
# Pairs whose cosines are measured at once: bounds the descriptors read for them.
PAIR_BLOCK = 65_536


def located_descriptors(images: KeyRanges, descriptors_uri: str) -> StoredVectors:
    """Row i is the descriptor of images row i (global, key order), read where it lies. Descriptors of the
    same rows (what copy_dedup's map writes) are read by position; of more rows, through a key merge."""
    if images.num_rows == 0:  # a stage given no rows writes no descriptor parts to locate
        return stored_vectors(images.offsets.take(np.zeros(0, np.int64)), DESCRIPTOR_COLUMN)
    descriptors = key_ranges(descriptors_uri)
    if descriptors.num_rows == images.num_rows:
        images.check_aligned(descriptors, "the descriptors manifest")
        return stored_vectors(descriptors.offsets, DESCRIPTOR_COLUMN)
    positions = subset_positions(images, descriptors, "the images")
    return stored_vectors(descriptors.offsets.take(positions), DESCRIPTOR_COLUMN)


def check_graph_settings(num_neighbours: int, threshold: float | None) -> None:
    """What every duplicate-graph config requires of k and the cosine threshold (raises ValueError);
    None: the stage calibrates it."""
    require(num_neighbours >= 1, f"num_neighbours must be >= 1, got {num_neighbours}")
    # Why not [-1, 1]: a copy threshold at or below 0 makes nearly every pair a copy (at -0.5 the demo
    # lost 246 of 247 pool images), and 1 makes none; both are mistakes, not settings.
    require(
        threshold is None or 0.0 < threshold < 1.0, f"threshold must be a cosine in (0, 1), got {threshold}"
    )


@dataclass(frozen=True, slots=True)
class DuplicateGraph:
    labels: np.ndarray  # int64 per images row: the smallest row index of its component
    edges: int  # distinct undirected edges
    index: str  # the index kind searched: flat | ivf
    seconds: float


class GraphIndex:
    """The searchable index of a graph's rows, in key order; the stage may probe it before the graph.

    Row ids are global rows in key order (`pipelines.partitions`), so tie-breaks follow the keys, never
    how upstream stages laid out their parts.
    """

    def __init__(self, descriptors: StoredVectors, graph_rows: np.ndarray | None, search: SearchConfig):
        if graph_rows is None:
            # Every row, index position i being images row i: no id array (8 bytes a row of the pool).
            self.ordered = None
            self.rows = descriptors
        else:
            graph_rows = np.asarray(graph_rows, dtype=np.int64)
            # Why no sort when sorted already (a stage's flatnonzero): a copy is 8 bytes a graph row.
            self.ordered = graph_rows if np.all(graph_rows[1:] > graph_rows[:-1]) else np.sort(graph_rows)
            self.rows = descriptors.take(self.ordered)
        self.num_images = len(descriptors)
        self.kind = search.kind_for(len(self.rows))
        self.searcher: Searcher | None = None
        self.started = time.perf_counter()

    def components(
        self, num_neighbours: int, threshold: float, bias: np.ndarray | None = None
    ) -> DuplicateGraph:
        """The graph's components; with `bias` (per index position), edges compare normalised scores."""
        assert self.searcher is not None, "GraphIndex is used inside graph_index(...)"
        labels, edges = streamed_components(
            self.rows, self.searcher, num_neighbours, threshold, self.ordered, self.num_images, bias
        )
        return DuplicateGraph(labels, edges, self.kind, time.perf_counter() - self.started)

    def positions(self, images_rows: np.ndarray) -> np.ndarray:
        """Where each of `images_rows` (rows of the graph) lies in the index."""
        return images_rows if self.ordered is None else np.searchsorted(self.ordered, images_rows)

    def images_rows(self, positions: np.ndarray) -> np.ndarray:
        """The images row at each index position."""
        return positions if self.ordered is None else self.ordered[positions]

    def neighbours(
        self, queries: np.ndarray, num_neighbours: int, allowed: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Up to `num_neighbours` nearest graph rows of each query (images row ids in the graph) among
        the `allowed` ones (bool per images row), the query itself left out; the search widens until
        each query has enough or all rows were searched.

        Returns:
            (images row ids [Q, k], cosines [Q, k]); id -1 and cosine nan where a query has fewer.
        """
        assert self.searcher is not None, "GraphIndex is used inside graph_index(...)"
        vectors = self.rows.read_rows(self.positions(queries))
        width = min(num_neighbours + 1, len(self.rows))
        while True:
            scores, found = knn_search(self.searcher, vectors, width)
            ids = np.where(found >= 0, self.images_rows(np.maximum(found, 0)), -1)
            keep = (ids >= 0) & (ids != queries[:, None]) & allowed[np.maximum(ids, 0)]
            # Why not widen a query the index returned empty slots to: an IVF index searches the same few
            # lists at any width, so asking it for more rows only grows the result arrays.
            widens = (keep.sum(axis=1) < num_neighbours) & (found >= 0).all(axis=1)
            if not widens.any() or width >= len(self.rows):
                break
            width = min(width * NEIGHBOUR_WIDENING, len(self.rows))
        rank = np.cumsum(keep, axis=1) - 1
        chosen = keep & (rank < num_neighbours)
        out_ids = np.full((len(queries), num_neighbours), -1, dtype=np.int64)
        out_scores = np.full((len(queries), num_neighbours), np.nan, dtype=np.float32)
        query_index = np.nonzero(chosen)[0]
        out_ids[query_index, rank[chosen]] = ids[chosen]
        out_scores[query_index, rank[chosen]] = scores[chosen]
        return out_ids, out_scores


@contextlib.contextmanager
def graph_index(
    descriptors: StoredVectors, graph_rows: np.ndarray | None, search: SearchConfig, executor: Executor
) -> Iterator[GraphIndex]:
    """The index of `graph_rows`' descriptors (None: every row's; one index here, or shards on the
    executor's workers)."""
    index = GraphIndex(descriptors, graph_rows, search)
    with database_index(index.rows, search, executor) as searcher:
        index.searcher = searcher
        yield index


def streamed_components(
    rows: VectorSource,
    searcher: Searcher,
    num_neighbours: int,
    threshold: float,
    row_ids: np.ndarray | None,
    num_ids: int,
    bias: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Labels of the k-NN graph's components and its number of distinct edges, the edges never held.

    Args:
        rows: The graph's vectors; `searcher` holds exactly these rows, in order.
        num_neighbours, threshold: k, and the cosine an edge must exceed.
        row_ids: Row i of `rows` is node row_ids[i] of the labels (e.g. an images row index); None: node i.
        num_ids: Nodes in the labels; those not in `row_ids` stay components of their own.
        bias: Optional, per row of `rows`: edges compare cosine minus the mean of the two biases.

    Returns:
        (labels [num_ids] int64: the smallest node of each node's component, distinct edges)
    """
    components = ComponentLabels(num_ids)
    with tempfile.TemporaryDirectory(prefix="lvd-edges-") as spill:
        tally = EdgeTally(len(rows), Path(spill))
        for batch in edge_batches(rows, searcher, num_neighbours, threshold, bias):
            if row_ids is None:
                components.add_edges(batch.sources, batch.targets)
            else:
                components.add_edges(row_ids[batch.sources], row_ids[batch.targets])
            tally.add(batch.sources, batch.targets)
        edges = tally.count()
    return components.labels(copy=False), edges


class EdgeTally:
    """Counts distinct undirected edges (low, high) fed batch by batch, where one may come twice.

    Why spill: an edge found from both ends comes in two batches, and the edge list is what must not be
    held. Each pair goes to a file chosen by its lower row, one file per `SEARCH_BATCH_ROWS` rows, and each
    file is deduplicated on its own: memory is one file's pairs.
    """

    def __init__(self, num_rows: int, folder: Path) -> None:
        self._num_rows = num_rows
        self._folder = folder
        self._files: set[int] = set()

    def add(self, low: np.ndarray, high: np.ndarray) -> None:
        if len(low) == 0:
            return
        pairs = low * self._num_rows + high  # one int64 per pair: < 2**63 for up to 3 billion rows
        order = np.argsort(low // SEARCH_BATCH_ROWS, kind="stable")
        buckets, starts = np.unique(low[order] // SEARCH_BATCH_ROWS, return_index=True)
        for file, chunk in zip(buckets.tolist(), np.split(pairs[order], starts[1:]), strict=True):
            with open(self._folder / f"{file}.bin", "ab") as handle:
                handle.write(chunk.astype(np.int64).tobytes())
            self._files.add(file)

    def count(self) -> int:
        return sum(
            len(np.unique(np.fromfile(self._folder / f"{file}.bin", dtype=np.int64))) for file in self._files
        )


@dataclass(frozen=True, slots=True)
class HeldRows:
    """The descriptors of a few images rows, read once; `held[images_rows]` gives theirs."""

    rows: np.ndarray  # sorted, distinct images row indices
    vectors: np.ndarray  # [len(rows), dim] unit float32

    def __getitem__(self, images_rows: np.ndarray) -> np.ndarray:
        return self.vectors[np.searchsorted(self.rows, images_rows)]


def held_rows(descriptors: StoredVectors, images_rows: np.ndarray) -> HeldRows:
    """Reads the descriptors of `images_rows` (any order, repeats allowed) and nothing else."""
    rows = np.unique(np.asarray(images_rows, dtype=np.int64))
    return HeldRows(rows, descriptors.read_rows(rows))


def pair_cosines(descriptors: StoredVectors, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """float32 cosine of images row first[i]'s descriptor with row second[i]'s, PAIR_BLOCK pairs at a
    time (memory: one block's vectors, whatever the number of pairs)."""
    cosines = np.empty(len(first), dtype=np.float32)
    for start in range(0, len(first), PAIR_BLOCK):
        block = slice(start, start + PAIR_BLOCK)
        held = held_rows(descriptors, np.concatenate([first[block], second[block]]))
        cosines[block] = np.einsum("ij,ij->i", held[first[block]], held[second[block]])
    return cosines
