"""Sharded k-NN: shard layout, the exact merge (equal to one flat index, ties included), executors'
held states, and copy_dedup / decontaminate / retrieve writing the same outputs with one index or several
shards."""

from __future__ import annotations

import functools
import itertools
import os
from dataclasses import replace

import faiss
import numpy as np
import pyarrow as pa
import pytest

import curation  # noqa: F401  (registers the stages)
from curation.cluster import ClusterConfig
from curation.dedup.copy import CopyDedupConfig
from curation.dedup.decontaminate import DecontaminateConfig
from curation.embed import EMBEDDINGS
from curation.retrieve import RetrievalSourceConfig, RetrieveConfig
from curation.search import SearchConfig
from curation.search.knn import ivf_lists, knn_edges, knn_search, searched_edges
from curation.search.sharded import merge_top_k, shard_bounds, sharded_index
from pipelines.executor import RayExecutor, SerialExecutor
from pipelines.stage import get_stage, run_stage
from pipelines.store import Store
from tests.unit.curation.copy_scenario import TEST_THRESHOLD, descriptor_model, ingest_copy_scenario
from tests.unit.curation.embedding_data import embeddings_table, planted, write_manifest

DIM = 24
DATABASE_ROWS = 500
# Faiss answers fewer than 20 queries with its own loops and more with BLAS: test both paths.
FEW_QUERIES, MANY_QUERIES = 7, 60
# Small integer coordinates: every dot product is an exact float32 integer, so ties are real ties.
TIE_LEVELS = 3
FLT_MAX = np.finfo(np.float32).max


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _flat_search(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(database.shape[1])
    index.add(database)
    return index.search(queries, k)


def _sharded_search(database, queries, k, num_shards, executor=None, kind="flat", nprobe=1):
    with sharded_index(database, num_shards, kind, executor or SerialExecutor(), nprobe) as index:
        assert index.ntotal == len(database)
        return index.search(queries, k)


def test_shard_bounds_cover_every_row_once_in_near_equal_runs():
    for num_rows in (0, 1, 2, 7, 10, 11, 500):
        for num_shards in (1, 2, 3, 4):
            bounds = shard_bounds(num_rows, num_shards)
            assert len(bounds) == max(1, min(num_shards, num_rows))
            assert bounds[0][0] == 0 and bounds[-1][1] == num_rows
            assert all(stop == start for (_, stop), (start, _) in itertools.pairwise(bounds))
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1 and (num_rows == 0 or min(sizes) >= 1)
    with pytest.raises(ValueError, match="num_shards"):
        shard_bounds(5, 0)


def test_merge_orders_by_score_then_higher_row_and_pads_like_faiss():
    scores = [np.array([[0.9, 0.5, 0.2]], np.float32), np.array([[0.5, 0.4, -FLT_MAX]], np.float32)]
    rows = [np.array([[1, 7, 0]]), np.array([[2, 5, -1]])]
    merged_scores, merged_rows = merge_top_k(scores, rows, 4)
    assert merged_rows.tolist() == [[1, 7, 2, 5]]  # 0.5 is tied between rows 7 and 2: the higher first
    np.testing.assert_array_equal(merged_scores, np.float32([[0.9, 0.5, 0.5, 0.4]]))
    padded_scores, padded_rows = merge_top_k(scores, rows, 6)
    assert padded_rows.tolist() == [[1, 7, 2, 5, 0, -1]]
    assert padded_scores[0, -1] == -FLT_MAX


@pytest.mark.parametrize("num_shards", [1, 2, 3])
@pytest.mark.parametrize("num_queries", [FEW_QUERIES, MANY_QUERIES])
def test_flat_shards_equal_one_flat_index_ids_and_scores(num_shards, num_queries):
    rng = np.random.default_rng(num_shards)
    database = _unit_rows(rng.standard_normal((DATABASE_ROWS, DIM)))
    queries = _unit_rows(rng.standard_normal((num_queries, DIM)))
    shard_rows = DATABASE_ROWS // num_shards
    # k below a shard, above a shard (its top-k cannot fill from one shard), and above the whole database.
    for k in (10, shard_rows + 17, DATABASE_ROWS + 3):
        expected_scores, expected_rows = _flat_search(database, queries, k)
        found_scores, found_rows = _sharded_search(database, queries, k, num_shards)
        np.testing.assert_array_equal(found_rows, expected_rows)
        np.testing.assert_array_equal(found_scores, expected_scores)
    # And against a closed form: numpy's scores in the order (score desc, row desc).
    k = min(shard_rows + 17, DATABASE_ROWS)
    _, found_rows = _sharded_search(database, queries, k, num_shards)
    brute = queries.astype(np.float64) @ database.T.astype(np.float64)
    np.testing.assert_array_equal(found_rows, np.argsort(-brute, axis=1, kind="stable")[:, :k])


@pytest.mark.parametrize("num_shards", [1, 2, 3])
@pytest.mark.parametrize("num_queries", [FEW_QUERIES, MANY_QUERIES])
def test_tied_scores_rank_by_higher_row_for_one_index_and_any_shards(num_shards, num_queries):
    rng = np.random.default_rng(10 + num_shards)
    distinct = rng.integers(-TIE_LEVELS, TIE_LEVELS + 1, size=(40, 8)).astype(np.float32)
    database = distinct[rng.integers(0, len(distinct), size=300)]  # many exact copies: tied scores
    queries = rng.integers(-TIE_LEVELS, TIE_LEVELS + 1, size=(num_queries, 8)).astype(np.float32)
    exact = queries.astype(np.int64) @ database.T.astype(np.int64)  # integers: no rounding anywhere
    ids = np.broadcast_to(np.arange(len(database)), exact.shape)
    single = faiss.IndexFlatIP(database.shape[1])
    single.add(database)
    # 130 is above every shard of 100 or 150 rows and cuts through runs of tied rows.
    for k in (1, 5, 130):
        order = np.lexsort((-ids, -exact), axis=-1)[:, :k]
        with sharded_index(database, num_shards, "flat", SerialExecutor()) as index:
            found_scores, found_rows = knn_search(index, queries, k)
        np.testing.assert_array_equal(found_rows, order)
        np.testing.assert_array_equal(found_scores, np.take_along_axis(exact, order, axis=1))
        np.testing.assert_array_equal(knn_search(single, queries, k)[1], order)


def test_a_tie_wider_than_every_shard_is_searched_to_its_end():
    database = np.ones((60, 4), np.float32)  # every row scores the same: the highest ids must win
    queries = np.ones((3, 4), np.float32)
    with sharded_index(database, 3, "flat", SerialExecutor()) as index:
        _, rows = knn_search(index, queries, 25)
    assert rows.tolist() == [list(range(59, 34, -1))] * 3


def test_ivf_shards_probing_every_list_find_the_exact_neighbours():
    rng = np.random.default_rng(5)
    centres = _unit_rows(rng.standard_normal((20, DIM)))
    database = _unit_rows(centres[rng.integers(0, 20, 2_000)] + 0.3 * rng.standard_normal((2_000, DIM)))
    queries = _unit_rows(rng.standard_normal((MANY_QUERIES, DIM)))
    k = 12
    expected_scores, expected_rows = _flat_search(database, queries, k)
    every_list = ivf_lists(len(database))
    found_scores, found_rows = _sharded_search(database, queries, k, 2, kind="ivf", nprobe=every_list)
    np.testing.assert_array_equal(found_rows, expected_rows)
    np.testing.assert_allclose(found_scores, expected_scores, atol=1e-5)


def test_knn_edges_through_shards_equal_the_single_index_graph():
    rng = np.random.default_rng(3)
    centres = _unit_rows(rng.standard_normal((120, 32)))
    members = np.repeat(centres, rng.integers(1, 5, size=len(centres)), axis=0)
    vectors = _unit_rows(members + 0.15 * rng.standard_normal(members.shape))
    single = knn_edges(vectors, 3, 0.8, SearchConfig(index="flat"))
    with sharded_index(vectors, 3, "flat", SerialExecutor()) as index:
        sharded = searched_edges(vectors, index, 3, 0.8)
    assert len(single) > 0
    for name in ("sources", "targets", "similarity"):
        np.testing.assert_array_equal(getattr(sharded, name), getattr(single, name))


def _state(value: int) -> tuple[int, int]:
    return value, os.getpid()


def _describe(state: tuple[int, int], item: int) -> tuple[int, int, int]:
    value, pid = state
    return value * item, pid, os.getpid()


def test_serial_holds_every_state_here_and_broadcasts_in_factory_order():
    built = []
    factories = [functools.partial(built.append, value) for value in (3, 1, 2)]
    with SerialExecutor().hold_states(factories) as states:
        assert built == [3, 1, 2]  # each built once, up front
        assert states.broadcast(lambda state, item: item, "q") == ["q", "q", "q"]
    with SerialExecutor().hold_states([functools.partial(_state, v) for v in (4, 5)]) as states:
        assert [result[0] for result in states.broadcast(_describe, 10)] == [40, 50]


def test_ray_holds_each_state_on_its_own_actor_and_sharded_search_matches(ray_session):
    executor = RayExecutor(num_workers=2)
    with executor.hold_states([functools.partial(_state, value) for value in (4, 5)]) as states:
        first, second = states.broadcast(_describe, 10), states.broadcast(_describe, 3)
    assert [value for value, _, _ in first] == [40, 50] and [value for value, _, _ in second] == [12, 15]
    # The state stays where it was built, in one process per state, none of them this one.
    pids = [pid for _, pid, _ in first]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert [pid for _, _, pid in first] == pids == [pid for _, pid, _ in second]
    rng = np.random.default_rng(8)
    database = _unit_rows(rng.standard_normal((DATABASE_ROWS, DIM)))
    queries = _unit_rows(rng.standard_normal((MANY_QUERIES, DIM)))
    k = DATABASE_ROWS // 2 + 9  # more than a shard holds
    expected_scores, expected_rows = _flat_search(database, queries, k)
    found_scores, found_rows = _sharded_search(database, queries, k, 2, executor)
    np.testing.assert_array_equal(found_rows, expected_rows)
    np.testing.assert_array_equal(found_scores, expected_scores)


def _digests(run) -> dict[str, str]:
    return {name: manifest.digest for name, manifest in run.outputs.items()}


def test_copy_dedup_outputs_are_the_same_with_one_index_or_shards(tmp_path):
    _, store, images = ingest_copy_scenario(tmp_path)
    # 16 neighbours: more than each of the 3 shards' 11 rows holds.
    cfg = CopyDedupConfig(
        num_neighbours=16, threshold=TEST_THRESHOLD, rows_per_shard=16, score_normalization=False
    )
    model = descriptor_model(store, images)
    runs = [
        run_stage(
            get_stage("copy_dedup"),
            replace(cfg, search=SearchConfig(shards=shards)),
            {"images": images, "model": model},
            store=store,
            show_progress=False,
        )
        for shards in (1, 3)
    ]
    assert runs[0].key != runs[1].key  # two real computations, not a reuse
    assert runs[0].outputs["rejected"].num_rows > 0 and runs[0].record["stats"]["edges"] > 0
    assert _digests(runs[0]) == _digests(runs[1])


def test_decontaminate_outputs_are_the_same_with_one_index_or_shards(tmp_path):
    _, store, images = ingest_copy_scenario(tmp_path)
    # Why 0.999: copy_dedup keeps the eval copies, so decontaminate has them to find.
    describe = CopyDedupConfig(threshold=0.999, rows_per_shard=16, score_normalization=False)
    model = descriptor_model(store, images)
    described = run_stage(get_stage("copy_dedup"), describe, {"images": images, "model": model}, store=store)
    inputs = {
        "images": described.outputs["images"],
        "descriptors": described.outputs["descriptors"],
        "model": model,
    }
    runs = [
        run_stage(
            get_stage("decontaminate"),
            DecontaminateConfig(
                num_neighbours=16,
                threshold=TEST_THRESHOLD,
                search=SearchConfig(shards=shards),
                score_normalization=False,
            ),
            inputs,
            store=store,
            show_progress=False,
        )
        for shards in (1, 3)
    ]
    assert runs[0].key != runs[1].key
    assert runs[0].outputs["rejected"].num_rows > 0 and runs[0].record["stats"]["edges"] > 0
    assert _digests(runs[0]) == _digests(runs[1])


POOL_CLUSTERS, POOL_PER_CLUSTER = 4, 15
SHARDED_SOURCES = (
    RetrievalSourceConfig(source="near", num_neighbours=25),  # more than a shard of 20 pool rows
    RetrievalSourceConfig(source="far", num_neighbours=3),
)


@pytest.fixture(scope="module")
def retrieve_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieve")
    pool, _ = planted(POOL_CLUSTERS, POOL_PER_CLUSTER, seed=3)
    near, _ = planted(3, 4, seed=7)
    far, _ = planted(2, 5, seed=8)
    tables = [
        embeddings_table(pool, "pool", "uncurated", "p"),
        embeddings_table(near, "near", "curated", "n"),
        embeddings_table(far, "far", "curated", "f"),
    ]
    embeddings = write_manifest(root / "in", "embeddings", EMBEDDINGS, pa.concat_tables(tables))
    clustered = run_stage(
        get_stage("cluster"),
        ClusterConfig(num_clusters=POOL_CLUSTERS, rows_per_shard=100),
        {"embeddings": embeddings},
        store=Store(root / "store"),
        show_progress=False,
    )
    return {
        "embeddings": embeddings,
        **{name: clustered.outputs[name] for name in ("assignments", "centroids")},
    }


def _retrieve(inputs, store, search_shards, executor=None):
    cfg = RetrieveConfig(sources=SHARDED_SOURCES, rows_per_shard=5, search=SearchConfig(shards=search_shards))
    return run_stage(get_stage("retrieve"), cfg, inputs, store=store, executor=executor, show_progress=False)


def test_retrieve_outputs_are_the_same_with_one_index_or_shards(retrieve_inputs, tmp_path):
    one = _retrieve(retrieve_inputs, Store(tmp_path / "one"), 1)
    three = _retrieve(retrieve_inputs, Store(tmp_path / "three"), 3)
    assert one.record["stats"]["query_shards"] == three.record["stats"]["query_shards"] == 5
    assert one.outputs["neighbours"].num_rows == 12 * 25 + 10 * 3
    assert _digests(one) == _digests(three)


def test_retrieve_on_ray_actors_with_shards_equals_serial_with_one_index(
    retrieve_inputs, tmp_path, ray_session
):
    serial = _retrieve(retrieve_inputs, Store(tmp_path / "serial"), 1)
    sharded = _retrieve(retrieve_inputs, Store(tmp_path / "ray"), 2, RayExecutor(num_workers=2))
    assert _digests(serial) == _digests(sharded)
