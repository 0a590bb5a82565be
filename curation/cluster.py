"""The `cluster` stage: spherical (cosine) k-means of the pool's embeddings.

embeddings (keys, role, embedding columns only) --rows of cfg.roles, in key order--> unit float32 rows
   --seeded sample (<= k * max_points_per_centroid rows; all of them: no copy)--> faiss.Kmeans(spherical)
   --> centroids
   --ctx.map_shards over key-sorted shards (views of the rows): nearest centroid of each row--> assignments
   --cluster sizes and the picture from one read of the assignments--> centroids (cluster, size, centroid)

Vectors never pass through Python objects and are converted once, so the stage's cost beyond raw Faiss
is one Parquet read of the keys and the embedding column, one float32 conversion, and the writes.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.pictures import Tile, contact_sheet
from curation.vectors import (
    RowVectors,
    embedding_array,
    float16_rows,
    key_order,
    read_columns,
    unit_rows,
    vector_shards,
)
from pipelines.config import ClusterConfig
from pipelines.images import read_image_bytes
from pipelines.manifest import ASSIGNMENTS, CENTROIDS, EMBEDDINGS
from pipelines.stage import Manifest, ShardResult, StageContext, StageSpec, register_stage

SHEET_NAME = "cluster_samples.png"
SHEET_CLUSTERS = 12
SHEET_IMAGES_PER_CLUSTER = 10
KEY_COLUMNS = ("image_id", "uri")


def assign_shard(centroids: np.ndarray, rows: RowVectors) -> ShardResult:
    """Shard worker: the nearest centroid (by cosine) of every row of an embeddings slice."""
    started = time.perf_counter()
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    similarity, nearest = index.search(rows.vectors, 1)
    table = pa.table(
        {
            "image_id": rows.keys.column("image_id"),
            "uri": rows.keys.column("uri"),
            "cluster": pa.array(nearest[:, 0].astype(np.int32)),
            "similarity": pa.array(similarity[:, 0].astype(np.float32)),
        }
    )
    seconds = round(time.perf_counter() - started, 3)
    return ShardResult(
        tables={"assignments": table}, stats={"assigned_rows": rows.keys.num_rows, "seconds": seconds}
    )


def train_centroids(vectors: np.ndarray, num_clusters: int, cfg: ClusterConfig) -> np.ndarray:
    """Spherical k-means centroids [k, d] (unit length) of `vectors`, on GPU when asked and present."""
    gpu = cfg.use_gpu and faiss.get_num_gpus() > 0
    kmeans = faiss.Kmeans(
        vectors.shape[1],
        num_clusters,
        niter=cfg.num_iterations,
        spherical=True,
        seed=cfg.seed,
        max_points_per_centroid=cfg.max_points_per_centroid,
        gpu=gpu,
        verbose=False,
    )
    kmeans.train(np.ascontiguousarray(vectors, dtype=np.float32))
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def _assigned(ctx: StageContext) -> pa.Table:
    """The cluster, similarity and uri columns of every assignments part this run wrote."""
    directory = ctx.store.output_dir(ctx.spec.name, ctx.key, "assignments")
    parts = ctx.store.list_parts(directory)
    return pq.read_table(parts, filesystem=ctx.store.fs, columns=["cluster", "similarity", "uri"])


def _samples_sheet(assigned: pa.Table, largest: list[int]) -> bytes:
    """One row per cluster (largest first): its members nearest to the centroid."""
    members = assigned.filter(pc.is_in(assigned.column("cluster"), pa.array(largest, pa.int32())))
    members = members.sort_by([("cluster", "ascending"), ("similarity", "descending"), ("uri", "ascending")])
    clusters = np.asarray(members.column("cluster"))
    rank = np.arange(len(clusters)) - np.searchsorted(clusters, clusters)  # position within its cluster
    picked: dict[int, list[Tile]] = {cluster: [] for cluster in largest}
    for row in members.filter(pa.array(rank < SHEET_IMAGES_PER_CLUSTER)).to_pylist():
        picked[row["cluster"]].append(uri_tile(row["uri"], f"c{row['cluster']} {row['similarity']:.2f}"))
    return contact_sheet(
        [picked[cluster] for cluster in largest], "k-means clusters, largest first (cosine to centroid)"
    )


def uri_tile(uri: str, caption: str) -> Tile:
    """A picture tile of the image at `uri` (an empty frame when it cannot be read)."""
    try:
        data = read_image_bytes({"uri": uri})
    except (OSError, ValueError, KeyError):
        data = None  # the picture is a report: a missing file leaves an empty frame
    return Tile(data, caption)


def run_cluster(cfg: ClusterConfig, inputs: Mapping[str, Manifest], ctx: StageContext) -> dict[str, Any]:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    table = read_columns(inputs["embeddings"], EMBEDDINGS, [*KEY_COLUMNS, "role", "embedding"])
    clustered = pc.is_in(table.column("role"), pa.array(list(cfg.roles), pa.string()))
    keys = table.select(list(KEY_COLUMNS)).filter(clustered)
    order = key_order(keys)
    # Key order, not part order: the seeded sample below must not depend on how upstream wrote its parts.
    rows = np.flatnonzero(np.asarray(clustered.combine_chunks()))[order]
    vectors = unit_rows(float16_rows(table.column("embedding")), rows)
    del table
    shards = vector_shards(keys.take(order), vectors, cfg.rows_per_shard)
    num_rows = len(vectors)
    if num_rows == 0:
        ctx.write_output("centroids", CENTROIDS.empty_table())
        ctx.write_output("assignments", ASSIGNMENTS.empty_table())
        return {"rows": 0, "clusters": 0}
    num_clusters = min(cfg.num_clusters, num_rows)
    train_rows = min(num_rows, num_clusters * cfg.max_points_per_centroid)
    training = vectors  # every row: no copy
    if train_rows < num_rows:
        sample = np.random.default_rng(cfg.seed).choice(num_rows, train_rows, replace=False)
        training = vectors[np.sort(sample)]
    timings["read_and_sample"] = time.perf_counter() - started

    started = time.perf_counter()
    centroids = train_centroids(training, num_clusters, cfg)
    del training
    timings["train"] = time.perf_counter() - started

    started = time.perf_counter()
    ctx.map_shards(functools.partial(assign_shard, centroids), shards, outputs=["assignments"])
    timings["assign"] = time.perf_counter() - started

    started = time.perf_counter()
    assigned = _assigned(ctx)
    sizes = np.bincount(np.asarray(assigned.column("cluster")), minlength=num_clusters)
    ctx.write_output(
        "centroids",
        pa.table(
            {
                "cluster": pa.array(np.arange(num_clusters, dtype=np.int32)),
                "size": pa.array(sizes.astype(np.int64)),
                "centroid": embedding_array(centroids),
            }
        ),
    )
    largest = [int(c) for c in np.argsort(-sizes, kind="stable")[:SHEET_CLUSTERS] if sizes[c] > 0]
    ctx.write_artifact(SHEET_NAME, _samples_sheet(assigned, largest))
    timings["sizes_and_picture"] = time.perf_counter() - started
    stats: dict[str, Any] = {
        "rows": num_rows,
        "clusters": num_clusters,
        "training_rows": train_rows,
        "empty_clusters": int((sizes == 0).sum()),
        "cluster_size": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())},
        "seconds": {phase: round(value, 3) for phase, value in timings.items()},
    }
    if num_clusters < cfg.num_clusters:
        stats["warning"] = f"num_clusters {cfg.num_clusters} capped at the {num_rows} rows to cluster"
    return stats


CLUSTER = register_stage(
    StageSpec(
        name="cluster",
        version=1,
        config_type=ClusterConfig,
        fn=run_cluster,
        inputs=("embeddings",),
        outputs={"centroids": CENTROIDS, "assignments": ASSIGNMENTS},
        description="spherical k-means on a seeded sample, every row assigned to its nearest centroid",
    )
)
