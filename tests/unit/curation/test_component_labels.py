"""Union-find fed in batches: any split and order of the edges gives the components of the whole graph."""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as scipy_components

from curation.dedup.components import ComponentLabels, connected_components

NUM_ROWS = 400
NUM_EDGES = 320  # below NUM_ROWS: many components of many sizes, plus singletons
NUM_BATCHES = 7


def _smallest_member_labels(num_rows: int, sources: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """scipy's component ids, renamed to the smallest row of each component."""
    graph = coo_matrix((np.ones(len(sources)), (sources, targets)), shape=(num_rows, num_rows))
    _, component = scipy_components(graph, directed=False)
    smallest = np.full(component.max() + 1, num_rows)
    np.minimum.at(smallest, component, np.arange(num_rows))
    return smallest[component]


def _random_edges(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sources = rng.integers(0, NUM_ROWS, NUM_EDGES)
    targets = rng.integers(0, NUM_ROWS, NUM_EDGES)
    # Repeated and reversed edges and self loops, as a k-NN search reports them from both ends.
    return np.concatenate([sources, targets[:40], sources[:5]]), np.concatenate(
        [targets, sources[:40], sources[:5]]
    )


def test_batches_in_any_order_give_the_whole_graphs_components():
    sources, targets = _random_edges(seed=0)
    expected = _smallest_member_labels(NUM_ROWS, sources, targets)
    assert len(np.unique(expected)) > 10  # a graph with real structure, not one blob
    np.testing.assert_array_equal(connected_components(NUM_ROWS, sources, targets), expected)
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(len(sources))
        components = ComponentLabels(NUM_ROWS)
        for batch in np.array_split(order, NUM_BATCHES):
            components.add_edges(sources[batch], targets[batch])
        np.testing.assert_array_equal(components.labels(), expected)


def test_a_chain_fed_one_edge_at_a_time_from_its_far_end():
    components = ComponentLabels(NUM_ROWS)
    for row in range(NUM_ROWS - 1, 0, -1):
        components.add_edges(np.array([row]), np.array([row - 1]))
    assert components.labels().tolist() == [0] * NUM_ROWS


def test_labels_are_a_copy_and_empty_batches_change_nothing():
    components = ComponentLabels(4)
    components.add_edges(np.array([], np.int64), np.array([], np.int64))
    labels = components.labels()
    labels[:] = 0
    assert components.labels().tolist() == [0, 1, 2, 3]
