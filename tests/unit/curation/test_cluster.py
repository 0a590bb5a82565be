"""The cluster stage: planted clusters recovered, bounded training sample, Serial == Ray, reruns reuse."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

import curation  # noqa: F401  (registers the stages)
from curation.cluster import ClusterConfig
from curation.embed import EMBEDDINGS
from pipelines.executor import RayExecutor
from pipelines.stage import get_stage, run_stage
from pipelines.store import Store
from tests.unit.curation.embedding_data import embeddings_table, planted, write_manifest

NUM_PLANTED = 6
PER_CLUSTER = 60


def _inputs(tmp_path):
    vectors, labels = planted(NUM_PLANTED, PER_CLUSTER, seed=1)
    seeds, _ = planted(2, 5, seed=2)
    table = pa.concat_tables(
        [
            embeddings_table(vectors, "pool", "uncurated", "p"),
            embeddings_table(seeds, "seeds", "curated", "s"),
        ]
    )
    return {"embeddings": write_manifest(tmp_path / "in", "embeddings", EMBEDDINGS, table)}, labels


def _run(tmp_path, cfg, store_name="store", executor=None):
    inputs, labels = _inputs(tmp_path)
    run = run_stage(
        get_stage("cluster"),
        cfg,
        inputs,
        store=Store(tmp_path / store_name),
        executor=executor,
        show_progress=False,
    )
    return run, labels


def test_cluster_recovers_planted_clusters_and_counts_sizes(tmp_path):
    cfg = ClusterConfig(num_clusters=NUM_PLANTED, rows_per_shard=100, num_iterations=25)
    run, labels = _run(tmp_path, cfg)
    assignments = run.outputs["assignments"].read().sort_by("image_id")
    assert assignments.num_rows == NUM_PLANTED * PER_CLUSTER  # the curated seeds are not clustered
    found = np.asarray(assignments.column("cluster"))
    # Each planted cluster lands in exactly one k-means cluster, and no two share one.
    pairs = {(int(a), int(b)) for a, b in zip(labels, found, strict=True)}
    assert len(pairs) == NUM_PLANTED
    assert len({found_cluster for _, found_cluster in pairs}) == NUM_PLANTED
    assert float(np.min(assignments.column("similarity"))) > 0.8
    centroids = run.outputs["centroids"].read()
    assert centroids.column("size").to_pylist() == [PER_CLUSTER] * NUM_PLANTED
    stats = run.record["stats"]
    assert stats["clusters"] == NUM_PLANTED and stats["empty_clusters"] == 0
    assert stats["training_rows"] == NUM_PLANTED * PER_CLUSTER
    assert "cluster_samples.png" in run.record["artifacts"]
    assert run_stage(get_stage("cluster"), cfg, _inputs(tmp_path)[0], store=Store(tmp_path / "store")).reused


def test_training_sample_is_bounded_and_cluster_count_capped(tmp_path):
    run, _ = _run(tmp_path, ClusterConfig(num_clusters=4, max_points_per_centroid=10, rows_per_shard=128))
    assert run.record["stats"]["training_rows"] == 40
    assert run.outputs["assignments"].num_rows == NUM_PLANTED * PER_CLUSTER  # every row still assigned
    capped, _ = _run(tmp_path, ClusterConfig(num_clusters=10_000), store_name="capped")
    assert capped.record["stats"]["clusters"] == NUM_PLANTED * PER_CLUSTER
    assert capped.record["stats"]["warnings"] == [
        f"num_clusters 10000 capped at the {NUM_PLANTED * PER_CLUSTER} rows to cluster"
    ]


def test_serial_and_ray_write_identical_outputs(tmp_path, ray_session):
    cfg = ClusterConfig(num_clusters=NUM_PLANTED, rows_per_shard=70)
    serial, _ = _run(tmp_path, cfg, "serial")
    ray_run, _ = _run(tmp_path, cfg, "ray", executor=RayExecutor(num_workers=2))
    for name in ("centroids", "assignments"):
        assert serial.outputs[name].digest == ray_run.outputs[name].digest


# float16 storage of the centroids moves cosines by about this much; Faiss used the float32 centroids.
STORED_CENTROID_TOLERANCE = 2e-3


def test_every_row_gets_its_nearest_centroid_by_brute_force(tmp_path):
    cfg = ClusterConfig(num_clusters=NUM_PLANTED + 2, rows_per_shard=64, num_iterations=5)
    run, _ = _run(tmp_path, cfg)
    embeddings = _inputs(tmp_path)[0]["embeddings"].read()
    pool = embeddings.filter(pa.compute.equal(embeddings.column("role"), "uncurated")).sort_by("image_id")
    stored = np.array(pool.column("embedding").to_pylist(), dtype=np.float64)
    unit = stored / np.linalg.norm(stored, axis=1, keepdims=True)
    centroids = np.array(run.outputs["centroids"].read().sort_by("cluster").column("centroid").to_pylist())
    cosines = unit @ centroids.T
    assignments = run.outputs["assignments"].read().sort_by("image_id")
    assert assignments.column("image_id").to_pylist() == pool.column("image_id").to_pylist()
    chosen = np.asarray(assignments.column("cluster"))
    best = cosines.max(axis=1)
    np.testing.assert_allclose(cosines[np.arange(len(chosen)), chosen], best, atol=STORED_CENTROID_TOLERANCE)
    np.testing.assert_allclose(
        np.asarray(assignments.column("similarity")), best, atol=STORED_CENTROID_TOLERANCE
    )
    sizes = run.outputs["centroids"].read().sort_by("cluster").column("size").to_pylist()
    assert sizes == np.bincount(chosen, minlength=NUM_PLANTED + 2).tolist()
