"""The retrieve stage: exact top-N in sample mode, collision policies, cluster mode's selection and caps,
query shards (any shard size, Serial == Ray, resume at the missing shard)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import curation  # noqa: F401  (registers the stages)
from curation.cluster import ASSIGNMENTS, ClusterConfig
from curation.embed import EMBEDDINGS
from curation.retrieve import RetrievalSourceConfig, RetrieveConfig
from curation.search import SearchConfig
from curation.vectors import embedding_matrix
from pipelines.executor import RayExecutor
from pipelines.stage import get_stage, run_stage
from pipelines.store import Store
from tests.unit.curation.embedding_data import embeddings_table, planted, write_manifest

NUM_PLANTED = 5
PER_CLUSTER = 50
NEIGHBOURS = 4


def _setup(tmp_path, seeds: dict[str, np.ndarray]):
    """Pool of planted clusters, the given seed sets; runs `cluster` and returns retrieve's inputs."""
    pool, _ = planted(NUM_PLANTED, PER_CLUSTER, seed=3)
    tables = [embeddings_table(pool, "pool", "uncurated", "p")]
    tables += [embeddings_table(vectors, name, "curated", name) for name, vectors in seeds.items()]
    embeddings = write_manifest(tmp_path / "in", "embeddings", EMBEDDINGS, pa.concat_tables(tables))
    store = Store(tmp_path / "store")
    cfg = ClusterConfig(num_clusters=NUM_PLANTED, rows_per_shard=100)
    clustered = run_stage(
        get_stage("cluster"), cfg, {"embeddings": embeddings}, store=store, show_progress=False
    )
    inputs = {
        "embeddings": embeddings,
        **{name: clustered.outputs[name] for name in ("assignments", "centroids")},
    }
    return inputs, store


def _retrieve(inputs, store, cfg, executor=None):
    return run_stage(get_stage("retrieve"), cfg, inputs, store=store, executor=executor, show_progress=False)


def test_sample_mode_equals_brute_force_top_n(tmp_path):
    queries, _ = planted(3, 4, seed=4)  # off-centre queries: neighbours come from several clusters
    inputs, store = _setup(tmp_path, {"seeds": queries})
    source = RetrievalSourceConfig(source="seeds", num_neighbours=NEIGHBOURS)
    run = _retrieve(inputs, store, RetrieveConfig(sources=(source,), search=SearchConfig(index="flat")))
    retrieved = run.outputs["retrieved"].read()
    embeddings = inputs["embeddings"].read(EMBEDDINGS)
    pool = embeddings.filter(pa.compute.equal(embeddings.column("role"), "uncurated"))
    seeds = embeddings.filter(pa.compute.equal(embeddings.column("source"), "seeds"))
    scores = embedding_matrix(seeds) @ embedding_matrix(pool).T
    pool_ids = pool.column("image_id").to_pylist()
    expected = {
        (query, pool_ids[column], rank)
        for query, row in zip(seeds.column("image_id").to_pylist(), scores, strict=True)
        for rank, column in enumerate(np.argsort(-row)[:NEIGHBOURS])
    }
    found = set(
        zip(
            *(retrieved.column(name).to_pylist() for name in ("query_image_id", "image_id", "rank")),
            strict=True,
        )
    )
    assert found == expected
    best = scores.max(axis=1)
    top = retrieved.filter(pa.compute.equal(retrieved.column("rank"), 0)).sort_by("query_image_id")
    np.testing.assert_allclose(np.asarray(top.column("similarity")), best, atol=1e-5)
    assert set(retrieved.column("mode").to_pylist()) == {"sample"}
    assert set(retrieved.column("source").to_pylist()) == {"pool"}
    assert "retrieval_examples.png" in run.record["artifacts"]
    # IVF probing every list (nprobe >= nlist on this small pool) must find the same neighbours.
    ivf = _retrieve(
        inputs, store, RetrieveConfig(sources=(source,), search=SearchConfig(index="ivf", ivf_nprobe=64))
    )
    ivf_rows = ivf.outputs["retrieved"].read()
    columns = (ivf_rows.column(name).to_pylist() for name in ("query_image_id", "image_id", "rank"))
    assert set(zip(*columns, strict=True)) == expected
    summary = run.outputs["summary"].read().to_pylist()
    assert summary == [
        {"seed_source": "seeds", "mode": "sample", "seed_images": 12, "retrieved": 48, "final": 48}
    ]


def test_collisions_are_counted_and_both_policies_honoured(tmp_path):
    twin, _ = planted(1, 1, seed=5)
    inputs, store = _setup(tmp_path, {"twins": np.repeat(twin, 3, axis=0)})  # 3 queries, same vector
    source = RetrievalSourceConfig(source="twins", num_neighbours=NEIGHBOURS)
    many = _retrieve(inputs, store, RetrieveConfig(sources=(source,), collisions="multiplicity"))
    stats = many.record["stats"]["sources"]["twins"]
    assert stats["collisions"] == NEIGHBOURS and stats["unique_pool_images"] == NEIGHBOURS
    assert many.outputs["retrieved"].num_rows == 3 * NEIGHBOURS
    once = _retrieve(inputs, store, RetrieveConfig(sources=(source,), collisions="keep_once"))
    kept = once.outputs["retrieved"].read()
    assert kept.num_rows == NEIGHBOURS
    assert sorted(kept.column("rank").to_pylist()) == list(range(NEIGHBOURS))
    assert once.record["stats"]["sources"]["twins"]["collisions"] == NEIGHBOURS


def test_cluster_mode_uses_clusters_with_more_than_t_hits_and_caps(tmp_path):
    centres, _ = planted(NUM_PLANTED, 1, seed=3)  # near the pool's planted centres
    hits_per_centre = [5, 3, 4, 0, 1]  # T = 3: the first and third qualify
    queries = np.repeat(centres, hits_per_centre, axis=0)
    inputs, store = _setup(tmp_path, {"fine": queries})
    images_per_cluster, cap = 30, 45  # every planted cluster has 50 pool images
    source = RetrievalSourceConfig(
        source="fine", mode="cluster", min_query_hits=3, images_per_cluster=images_per_cluster, max_images=cap
    )
    run = _retrieve(inputs, store, RetrieveConfig(sources=(source,)))
    retrieved = run.outputs["retrieved"].read()
    assignments = inputs["assignments"].read()
    cluster_of = dict(
        zip(
            assignments.column("image_id").to_pylist(), assignments.column("cluster").to_pylist(), strict=True
        )
    )
    # The qualifying clusters by brute force: each query's nearest centroid, clusters with > 3 of them.
    centroids = embedding_matrix(inputs["centroids"].read().sort_by("cluster"), "centroid")
    nearest = np.argmax(queries @ centroids.T, axis=1)
    counts = np.bincount(nearest, minlength=len(centroids))
    wanted = set(np.flatnonzero(counts > 3).tolist())
    assert len(wanted) >= 2
    clusters = retrieved.column("cluster").to_pylist()
    assert set(clusters) == wanted
    assert all(clusters.count(cluster) <= images_per_cluster for cluster in wanted)
    assert retrieved.num_rows == cap
    assert [cluster_of[image] for image in retrieved.column("image_id").to_pylist()] == clusters
    assert retrieved.column("query_image_id").null_count == cap
    stats = run.record["stats"]["sources"]["fine"]
    assert stats["clusters_used"] == len(wanted)
    sizes = np.bincount(np.asarray(assignments.column("cluster")), minlength=len(centroids))
    before_cap = sum(min(int(sizes[cluster]), images_per_cluster) for cluster in wanted)
    assert stats["retrieved_before_cap"] == before_cap > cap
    uncapped = RetrievalSourceConfig(source="fine", mode="cluster", images_per_cluster=images_per_cluster)
    assert (
        _retrieve(inputs, store, RetrieveConfig(sources=(uncapped,))).outputs["retrieved"].num_rows
        == before_cap
    )


def test_only_assigned_pool_rows_are_retrieved(tmp_path):
    queries, _ = planted(2, 3, seed=6)
    inputs, store = _setup(tmp_path, {"seeds": queries})
    source = RetrievalSourceConfig(source="seeds", num_neighbours=NEIGHBOURS)
    cfg = RetrieveConfig(sources=(source,), search=SearchConfig(index="flat"))
    first = set(_retrieve(inputs, store, cfg).outputs["retrieved"].read().column("image_id").to_pylist())
    # A pool row the cluster stage never saw (e.g. dropped upstream) is not in the pool.
    assignments = inputs["assignments"].read()
    kept = assignments.filter(
        pa.compute.invert(pa.compute.is_in(assignments.column("image_id"), pa.array(sorted(first))))
    )
    inputs = {**inputs, "assignments": write_manifest(tmp_path / "in", "assignments", ASSIGNMENTS, kept)}
    second = set(_retrieve(inputs, store, cfg).outputs["retrieved"].read().column("image_id").to_pylist())
    assert second and not second & first


def test_a_pool_source_cannot_be_a_seed_source(tmp_path):
    inputs, store = _setup(tmp_path, {})
    cfg = RetrieveConfig(sources=(RetrievalSourceConfig(source="pool"),))
    with pytest.raises(ValueError, match="uncurated"):
        _retrieve(inputs, store, cfg)
    missing = _retrieve(inputs, store, RetrieveConfig(sources=(RetrievalSourceConfig(source="absent"),)))
    assert missing.outputs["retrieved"].num_rows == 0
    assert missing.record["stats"]["warnings"] == ["no embeddings of source 'absent': nothing retrieved"]


def test_more_neighbours_than_pool_images_are_capped_with_a_warning(tmp_path):
    queries, _ = planted(2, 3, seed=6)
    inputs, store = _setup(tmp_path, {"seeds": queries})
    pool = inputs["assignments"].num_rows
    source = RetrievalSourceConfig(source="seeds", num_neighbours=pool + 5)
    run = _retrieve(inputs, store, RetrieveConfig(sources=(source,)))
    assert run.record["stats"]["warnings"] == [
        f"seeds: num_neighbours {pool + 5} capped at the {pool} pool images"
    ]
    assert run.outputs["retrieved"].num_rows == len(queries) * pool  # every pool image, once per query


SHARD_QUERIES = 5  # 12 + 10 queries: 3 + 2 search shards
SHARDED_SOURCES = (
    RetrievalSourceConfig(source="near", num_neighbours=NEIGHBOURS),
    RetrievalSourceConfig(source="far", num_neighbours=2),
    RetrievalSourceConfig(source="fine", mode="cluster", min_query_hits=1, images_per_cluster=7),
)


def _sharded_setup(tmp_path):
    near, _ = planted(3, 4, seed=7)
    far, _ = planted(2, 5, seed=8)
    fine, _ = planted(NUM_PLANTED, 2, seed=3)
    return _setup(tmp_path, {"near": near, "far": far, "fine": fine})


def _digests(run) -> dict[str, str]:
    return {name: manifest.digest for name, manifest in run.outputs.items()}


def test_query_shards_change_only_the_neighbours_parts(tmp_path):
    inputs, store = _sharded_setup(tmp_path)
    one = _retrieve(inputs, store, RetrieveConfig(sources=SHARDED_SOURCES, rows_per_shard=1_000))
    many = _retrieve(inputs, store, RetrieveConfig(sources=SHARDED_SOURCES, rows_per_shard=SHARD_QUERIES))
    assert (one.record["stats"]["query_shards"], many.record["stats"]["query_shards"]) == (2, 5)
    assert len(list(Path(many.outputs["neighbours"].uri).glob("part-*.parquet"))) == 5
    for name in ("retrieved", "summary"):
        assert one.outputs[name].digest == many.outputs[name].digest
    # neighbours: every query's N nearest, before the policy (here multiplicity: the sample-mode rows).
    neighbours = many.outputs["neighbours"].read()
    assert neighbours.num_rows == 12 * NEIGHBOURS + 10 * 2
    retrieved = many.outputs["retrieved"].read()
    sample = retrieved.filter(pa.compute.equal(retrieved.column("mode"), "sample"))
    key = ("seed_source", "query_image_id", "image_id", "rank")
    assert set(zip(*(neighbours.column(c).to_pylist() for c in key), strict=True)) == set(
        zip(*(sample.column(c).to_pylist() for c in key), strict=True)
    )


def test_serial_and_ray_write_identical_outputs(tmp_path, ray_session):
    inputs, store = _sharded_setup(tmp_path)
    cfg = RetrieveConfig(sources=SHARDED_SOURCES, rows_per_shard=SHARD_QUERIES, collisions="keep_once")
    serial = _retrieve(inputs, store, cfg)
    parallel = _retrieve(inputs, Store(tmp_path / "ray"), cfg, RayExecutor(num_workers=2))
    assert serial.key == parallel.key
    assert _digests(serial) == _digests(parallel)


def test_a_partial_run_resumes_at_the_missing_query_shard(tmp_path):
    inputs, store = _sharded_setup(tmp_path)
    cfg = RetrieveConfig(sources=SHARDED_SOURCES, rows_per_shard=SHARD_QUERIES)
    full = _retrieve(inputs, store, cfg)
    parts = sorted(Path(full.outputs["neighbours"].uri).glob("part-*.parquet"))
    # Simulate a run killed after all but one search shard: its part, its record and the commit are gone.
    lost = parts[0].stem.removeprefix("part-")
    parts[0].unlink()
    Path(store.shard_record_path("retrieve", full.key, lost)).unlink()
    Path(store.record_path("retrieve", full.key)).unlink()
    kept = {part: part.stat().st_ino for part in parts[1:]}
    resumed = _retrieve(inputs, store, cfg)
    assert not resumed.reused
    assert _digests(resumed) == _digests(full)
    assert parts[0].exists()
    assert {part: part.stat().st_ino for part in parts[1:]} == kept  # finished shards were not redone
    sources = resumed.record["stats"]["sources"]
    assert (sources["near"]["rows"], sources["far"]["rows"]) == (12 * NEIGHBOURS, 10 * 2)
