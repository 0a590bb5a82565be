"""The cluster stage streams: shard by shard it assigns exactly what one all-at-once assignment gives."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import curation  # noqa: F401  (registers the stages)
from curation.cluster import (
    SHEET_IMAGES_PER_CLUSTER,
    ClusterConfig,
    cluster_sizes,
    sheet_members,
    train_centroids,
)
from curation.embed import EMBEDDINGS
from curation.vectors import embedding_matrix
from pipelines.manifest import read_manifest
from pipelines.stage import Manifest, get_stage, run_stage
from pipelines.store import Store
from tests.unit.curation.embedding_data import embeddings_table, planted

NUM_PLANTED = 5
PER_CLUSTER = 70
NUM_PARTS = 4
CFG = ClusterConfig(
    num_clusters=NUM_PLANTED + 3,
    max_points_per_centroid=20,
    num_iterations=6,
    rows_per_shard=45,
    use_gpu=False,
)
# Faiss scores small query batches with another kernel than large ones: the last float32 bit may differ.
SCORE_TOLERANCE = 1e-6


def _manifest(folder) -> Manifest:
    """Pool rows plus curated rows, keys shuffled across NUM_PARTS parts (not in key order)."""
    pool, _ = planted(NUM_PLANTED, PER_CLUSTER, seed=3)
    seeds, _ = planted(2, 9, seed=4)
    table = pa.concat_tables(
        [embeddings_table(pool, "pool", "uncurated", "p"), embeddings_table(seeds, "seeds", "curated", "s")]
    )
    table = table.take(np.random.default_rng(5).permutation(table.num_rows))
    folder.mkdir()
    for index, part in enumerate(np.array_split(np.arange(table.num_rows), NUM_PARTS)):
        pq.write_table(table.take(part), folder / f"part-{index}.parquet")
    return Manifest(uri=str(folder), schema_name="embeddings", digest="shuffled", num_rows=table.num_rows)


def _all_at_once(manifest: Manifest) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """The whole pool as one float32 matrix in key order, trained on the same seeded sample, one search."""
    table = read_manifest(manifest.uri, EMBEDDINGS)
    pool = table.filter(pc.is_in(table.column("role"), pa.array(list(CFG.roles)))).sort_by(
        [("image_id", "ascending"), ("uri", "ascending")]
    )
    vectors = embedding_matrix(pool)
    train_rows = CFG.num_clusters * CFG.max_points_per_centroid
    sample = np.sort(np.random.default_rng(CFG.seed).choice(len(vectors), train_rows, replace=False))
    centroids = train_centroids(vectors[sample], CFG.num_clusters, CFG)
    scores = vectors @ centroids.T
    return pool, centroids, scores


def test_streamed_assignment_equals_the_all_at_once_assignment(tmp_path):
    manifest = _manifest(tmp_path / "in")
    run = run_stage(get_stage("cluster"), CFG, {"embeddings": manifest}, store=Store(tmp_path / "store"))
    assert run.record["stats"]["training_rows"] == CFG.num_clusters * CFG.max_points_per_centroid
    pool, centroids, scores = _all_at_once(manifest)
    stored = run.outputs["centroids"].read().sort_by("cluster")
    np.testing.assert_array_equal(
        np.array(stored.column("centroid").to_pylist(), np.float16), centroids.astype(np.float16)
    )
    assignments = run.outputs["assignments"].read().sort_by([("image_id", "ascending"), ("uri", "ascending")])
    assert assignments.column("image_id").to_pylist() == pool.column("image_id").to_pylist()
    chosen = np.asarray(assignments.column("cluster"))
    np.testing.assert_array_equal(chosen, scores.argmax(axis=1))
    np.testing.assert_allclose(
        np.asarray(assignments.column("similarity")), scores.max(axis=1), rtol=0, atol=SCORE_TOLERANCE
    )
    assert stored.column("size").to_pylist() == np.bincount(chosen, minlength=CFG.num_clusters).tolist()


def test_sizes_and_sheet_members_read_part_by_part_equal_one_pass_over_all_rows(tmp_path):
    run = run_stage(
        get_stage("cluster"), CFG, {"embeddings": _manifest(tmp_path / "in")}, store=Store(tmp_path / "s")
    )
    store = Store(tmp_path / "s")
    parts = store.list_parts(store.output_dir("cluster", run.key, "assignments"))
    assert len(parts) > 1
    rows = run.outputs["assignments"].read().to_pylist()
    sizes = cluster_sizes(store.fs, parts, CFG.num_clusters)
    assert sizes.tolist() == [sum(row["cluster"] == c for row in rows) for c in range(CFG.num_clusters)]
    largest = [3, 0, 5]
    members = sheet_members(store.fs, parts, largest).to_pylist()
    expected = []
    for cluster in sorted(largest):
        mine = [row for row in rows if row["cluster"] == cluster]
        nearest = sorted(mine, key=lambda row: (-row["similarity"], row["uri"]))[:SHEET_IMAGES_PER_CLUSTER]
        expected += [{name: row[name] for name in ("cluster", "similarity", "uri")} for row in nearest]
    assert members == expected
