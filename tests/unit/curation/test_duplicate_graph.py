"""The streamed duplicate graph: the same components and edge count as one whole edge list, with the
descriptors read block by block from key-ranged parts (named out of key order), located by position or
by a key merge for a subset of their rows, one index or several shards, and batches small enough that
edges cross them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.dedup import graph as graph_module
from curation.dedup.components import connected_components
from curation.dedup.descriptors import descriptors_table
from curation.dedup.graph import DuplicateGraph, EdgeTally, graph_index, located_descriptors
from curation.search import SearchConfig, knn
from curation.search.knn import build_index, knn_edges
from pipelines.executor import SerialExecutor
from pipelines.partitions import key_ranges

DIM = 32
NUM_PARTS = 4
# Small query batches (and spill buckets): the graph's edges cross batches and come from both ends.
BATCH_ROWS = 16
THRESHOLD = 0.8
NEIGHBOURS = 4


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(knn, "SEARCH_BATCH_ROWS", BATCH_ROWS)
    monkeypatch.setattr(graph_module, "SEARCH_BATCH_ROWS", BATCH_ROWS)


def _write_ranges(table: pa.Table, folder, num_parts: int, rng) -> None:
    """`table` (in key order) as `num_parts` key ranges, their file names in a shuffled order."""
    folder.mkdir()
    names = rng.permutation(num_parts)
    for name, rows in zip(names, np.array_split(np.arange(table.num_rows), num_parts), strict=True):
        pq.write_table(table.take(rows), folder / f"part-{name}.parquet")


@pytest.fixture
def stored(tmp_path):
    """images (keys only), their descriptors in other key-ranged parts, and the float16 values, in key
    order; `subset`: every images row but each seventh, and their values."""
    rng = np.random.default_rng(5)
    centres = _unit_rows(rng.standard_normal((60, DIM)))
    members = np.repeat(centres, rng.integers(1, 5, size=len(centres)), axis=0)
    vectors = _unit_rows(members + 0.05 * rng.standard_normal(members.shape))
    ids = [f"{row:04d}" for row in range(len(vectors))]
    keys = pa.table({"image_id": ids, "uri": [f"/pool/{name}.png" for name in ids]})
    _write_ranges(descriptors_table(keys, vectors), tmp_path / "descriptors", NUM_PARTS, rng)
    _write_ranges(keys, tmp_path / "images", NUM_PARTS - 1, rng)
    subset = np.flatnonzero(np.arange(keys.num_rows) % 7 != 3)
    _write_ranges(keys.take(subset), tmp_path / "subset", NUM_PARTS + 1, rng)
    stored_float16 = descriptors_table(keys, vectors).column("descriptor").combine_chunks().flatten()
    stored_values = _unit_rows(np.asarray(stored_float16, dtype=np.float32).reshape(-1, DIM))
    images = key_ranges(str(tmp_path / "images"))
    descriptors = located_descriptors(images, str(tmp_path / "descriptors"))
    subset_descriptors = located_descriptors(
        key_ranges(str(tmp_path / "subset")), str(tmp_path / "descriptors")
    )
    return images.num_rows, descriptors, stored_values, subset_descriptors, stored_values[subset]


def _graph(descriptors, scope: np.ndarray, shards: int) -> DuplicateGraph:
    search = SearchConfig(index="flat", ivf_min_rows=10**6, ivf_nprobe=8, shards=shards)
    with graph_index(descriptors, scope, search, SerialExecutor()) as index:
        return index.components(NEIGHBOURS, THRESHOLD)


@pytest.mark.parametrize("shards", [1, 3])
def test_streamed_graph_equals_the_whole_edge_list(stored, small_batches, shards):
    num_rows, descriptors, vectors, _, _ = stored
    scope = np.flatnonzero(np.arange(num_rows) % 5 != 0)  # some rows stay out of the graph
    expected = knn_edges(vectors[scope], NEIGHBOURS, THRESHOLD, SearchConfig(index="flat"))
    expected_labels = connected_components(num_rows, scope[expected.sources], scope[expected.targets])
    found = _graph(descriptors, scope, shards)
    assert len(expected) > BATCH_ROWS  # enough edges to cross batches
    np.testing.assert_array_equal(found.labels, expected_labels)
    assert found.edges == len(expected) and found.index == "flat"
    assert (found.labels[np.arange(0, num_rows, 5)] == np.arange(0, num_rows, 5)).all()


def test_descriptors_are_read_as_stored_and_matched_to_their_images(stored):
    num_rows, descriptors, vectors, subset_descriptors, subset_vectors = stored
    np.testing.assert_array_equal(descriptors.read(0, num_rows), vectors)
    rows = np.array([3, 17, 40])
    np.testing.assert_array_equal(descriptors.read_rows(rows), vectors[rows])
    # A subset of the described rows finds each of its rows' descriptors through the key merge.
    assert len(subset_descriptors) == len(subset_vectors) < num_rows
    np.testing.assert_array_equal(subset_descriptors.read(0, len(subset_vectors)), subset_vectors)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_an_index_filled_from_parts_equals_the_index_of_the_array(stored, small_batches, kind):
    _, descriptors, vectors, _, _ = stored
    from_parts, from_array = build_index(descriptors, kind, nprobe=2), build_index(vectors, kind, nprobe=2)
    assert from_parts.ntotal == from_array.ntotal == len(vectors)
    for got, want in zip(from_parts.search(vectors, 5), from_array.search(vectors, 5), strict=True):
        np.testing.assert_array_equal(got, want)


def test_edge_tally_counts_each_pair_once_across_batches_and_files(tmp_path, small_batches):
    rng = np.random.default_rng(2)
    num_rows = 100
    low = rng.integers(0, num_rows - 1, size=400)
    high = low + 1 + rng.integers(0, num_rows - 1 - low)
    tally = EdgeTally(num_rows, tmp_path)
    for batch in np.array_split(np.arange(len(low)), 7):  # repeats within and across batches
        tally.add(low[batch], high[batch])
    tally.add(np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert len(list(tmp_path.iterdir())) == len(np.unique(low // BATCH_ROWS)) > 1
    assert tally.count() == len(set(zip(low.tolist(), high.tolist(), strict=True)))
