"""copy_dedup: Faiss k-NN against brute force, planted copies found, keep rule, resume, Serial == Ray."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import curation  # noqa: F401  (registers the stages)
from curation.dedup.components import DUPLICATES_REJECTED, preference_order
from curation.dedup.copy import CopyDedupConfig
from curation.dedup.decontaminate import DecontaminateConfig
from curation.dedup.descriptors import DESCRIPTORS
from curation.dedup.probe import NEAR_MISSES_OVER, NEAR_MISSES_UNDER
from curation.search import SearchConfig
from curation.search.knn import ivf_lists, knn_edges
from pipelines.executor import RayExecutor
from pipelines.manifest import IMAGES, read_manifest
from pipelines.stage import Manifest, get_stage, run_stage
from pipelines.store import Store
from tests.unit.curation.copy_scenario import (
    TEST_NEIGHBOURS,
    TEST_THRESHOLD,
    descriptor_model,
    ingest_copy_scenario,
)

# Raw cosines at the scenario's threshold (normalisation has tests of its own).
CONFIG = CopyDedupConfig(
    num_neighbours=TEST_NEIGHBOURS, threshold=TEST_THRESHOLD, rows_per_shard=8, score_normalization=False
)


NEAR_MISS_SHEETS = (NEAR_MISSES_OVER, NEAR_MISSES_UNDER)


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _brute_force_edges(vectors: np.ndarray, k: int, threshold: float) -> set[tuple[int, int]]:
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)
    nearest = np.argsort(-scores, axis=1)[:, :k]
    return {
        (min(i, j), max(i, j)) for i in range(len(vectors)) for j in nearest[i] if scores[i, j] > threshold
    }


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_knn_edges_equal_numpy_brute_force(index):
    rng = np.random.default_rng(0)
    centres = _unit_rows(rng.standard_normal((300, 32)))
    # Each centre gets 1 to 4 noisy copies: tight groups above the threshold, bigger than k for some.
    members = np.repeat(centres, rng.integers(1, 5, size=len(centres)), axis=0)
    vectors = _unit_rows(members + 0.15 * rng.standard_normal(members.shape))
    k, threshold = 3, 0.8
    nprobe = ivf_lists(len(vectors))  # every list: IVF must then be exact
    edges = knn_edges(vectors, k, threshold, SearchConfig(index=index, ivf_nprobe=nprobe))
    assert set(zip(edges.sources.tolist(), edges.targets.tolist(), strict=True)) == _brute_force_edges(
        vectors, k, threshold
    )
    assert (edges.sources < edges.targets).all() and (edges.similarity > threshold).all()
    direct = np.einsum("ij,ij->i", vectors[edges.sources], vectors[edges.targets])
    np.testing.assert_allclose(edges.similarity, direct, atol=1e-6)


def test_knn_edges_on_sets_smaller_than_k():
    assert len(knn_edges(np.zeros((0, 4), np.float32), 64, 0.6)) == 0
    assert len(knn_edges(_unit_rows(np.ones((1, 4))), 64, 0.6)) == 0
    pair = _unit_rows(np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]))
    edges = knn_edges(pair, 64, 0.6)
    assert edges.sources.tolist() == [0] and edges.targets.tolist() == [1]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    return ingest_copy_scenario(tmp_path_factory.mktemp("copies"))


def _copy_dedup(scenario, store=None, executor=None, cfg=CONFIG):
    _, own_store, images = scenario
    return run_stage(
        get_stage("copy_dedup"),
        cfg,
        {"images": images, "model": descriptor_model(store or own_store, images)},
        store=store or own_store,
        executor=executor,
        show_progress=False,
    )


def _checked_rejects(run, images) -> dict[str, dict]:
    """Rejected rows by URI, after checking what holds for any config: keep rule, match, similarity."""
    rejected = read_manifest(run.outputs["rejected"].uri, DUPLICATES_REJECTED).to_pylist()
    descriptors = read_manifest(run.outputs["descriptors"].uri, DESCRIPTORS)
    assert descriptors.num_rows == images.num_rows, "every input row gets a descriptor"
    assert run.outputs["images"].num_rows + len(rejected) == images.num_rows
    rows = images.to_pylist()
    rank = {rows[row]["uri"]: position for position, row in enumerate(preference_order(images, CONFIG.keep))}
    uri_of_id = {row["image_id"]: row["uri"] for row in rows}
    vectors = {row["uri"]: np.asarray(row["descriptor"], np.float32) for row in descriptors.to_pylist()}
    dropped = {row["uri"]: row for row in rejected}
    for row in rejected:
        assert row["reason"] == "copy_duplicate" and row["role"] == "uncurated"
        # The match is the kept row of the component, which comes first in the keep rule's order.
        assert row["match_uri"] not in dropped and uri_of_id[row["group_id"]] == row["match_uri"]
        assert rank[row["match_uri"]] < rank[row["uri"]]
        direct = vectors[row["uri"]] @ vectors[row["match_uri"]]
        assert row["similarity"] == pytest.approx(direct, abs=2e-3)
    stats = run.record["stats"]
    assert stats["rows_in"] == images.num_rows and stats["rejected"] == len(rejected)
    assert stats["descriptors"]["rows"] == images.num_rows
    # Pairs on both sides of the set threshold exist here, so both near-miss sheets are drawn.
    assert set(run.record["artifacts"]) == {"duplicate_groups.png", *NEAR_MISS_SHEETS}
    return dropped


def test_copy_dedup_finds_the_planted_copies_in_the_pool(scenario):
    built, _, images = scenario
    run = _copy_dedup(scenario)
    dropped = _checked_rejects(run, images.read(IMAGES))
    pool_pairs = {copy: original for copy, original in built.copy_of.items() if "/pool/" in original}
    for copy_uri, original_uri in pool_pairs.items():
        assert (copy_uri in dropped) != (original_uri in dropped), copy_uri  # exactly one of each pair goes
    assert len(dropped) == len(pool_pairs), sorted(dropped)  # copies of seeds and eval are not its business
    stats = run.record["stats"]
    assert stats["groups"] == len(pool_pairs) and stats["largest_group"] == 2
    assert stats["rows_compared"] == images.num_rows - 1 - len(built.eval_uris)


def test_copy_dedup_across_roles_keeps_seeds_and_eval_and_drops_their_copies(scenario):
    built, _, images = scenario
    every_role = replace(CONFIG, roles=("uncurated", "curated", "eval"))
    run = _copy_dedup(scenario, cfg=every_role)
    dropped = _checked_rejects(run, images.read(IMAGES))
    for copy_uri, original_uri in built.copy_of.items():
        assert copy_uri in dropped or original_uri in dropped, copy_uri
    assert len(dropped) == len(built.copy_of), sorted(dropped)
    assert dropped[next(uri for uri in built.copy_of if "copy_seed" in uri)]["match_uri"] == built.seed_uri
    for uri, row in dropped.items():
        if "evalcopy_0" in uri:
            assert row["match_uri"] == built.eval_uris[0]
    assert run.record["stats"]["groups"] == 11 and run.record["stats"]["largest_group"] == 3


def test_rerun_reuses_and_a_lost_shard_is_recomputed_alone(scenario):
    first = _copy_dedup(scenario)
    assert _copy_dedup(scenario).reused
    store = scenario[1]
    parts = store.list_parts(store.output_dir("copy_dedup", first.key, "descriptors"))
    lost = parts[0].rsplit("/", 1)[-1].removeprefix("part-").removesuffix(".parquet")
    store.fs.rm_file(store.record_path("copy_dedup", first.key))
    store.fs.rm_file(store.shard_record_path("copy_dedup", first.key, lost))
    store.fs.rm_file(parts[0])
    untouched = {path: store.fs.modified(path) for path in parts[1:]}
    again = _copy_dedup(scenario)
    assert not again.reused
    assert {name: m.digest for name, m in again.outputs.items()} == {
        name: m.digest for name, m in first.outputs.items()
    }
    assert {path: store.fs.modified(path) for path in parts[1:]} == untouched


def test_serial_and_ray_give_identical_outputs(scenario, tmp_path, ray_session):
    serial = _copy_dedup(scenario, store=Store(tmp_path / "serial"))
    ray = _copy_dedup(scenario, store=Store(tmp_path / "ray"), executor=RayExecutor(num_workers=2))
    assert serial.key == ray.key
    assert {name: m.digest for name, m in serial.outputs.items()} == {
        name: m.digest for name, m in ray.outputs.items()
    }


def test_no_images_commit_empty_outputs(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    images = Manifest(uri=str(folder), schema_name=IMAGES.name, digest="empty", num_rows=0)
    store = Store(tmp_path / "store")
    model = descriptor_model(store, images)
    run = run_stage(get_stage("copy_dedup"), CONFIG, {"images": images, "model": model}, store=store)
    assert {name: m.num_rows for name, m in run.outputs.items()} == {
        "images": 0,
        "rejected": 0,
        "descriptors": 0,
    }
    inputs = {"images": run.outputs["images"], "descriptors": run.outputs["descriptors"], "model": model}
    decontaminated = run_stage(
        get_stage("decontaminate"),
        DecontaminateConfig(threshold=TEST_THRESHOLD, score_normalization=False),
        inputs,
        store=store,
    )
    assert decontaminated.outputs["rejected"].num_rows == 0
