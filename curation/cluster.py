"""The `cluster` stage: spherical (cosine) k-means of the pool's embeddings.

embeddings --rows of cfg.roles, sorted by key--> seeded sample (<= k * max_points_per_centroid rows)
   --faiss.Kmeans(spherical)--> centroids
   --ctx.map_shards: nearest centroid of every row, one shard at a time--> assignments
   --cluster sizes from the assignments' cluster column--> centroids (cluster, size, centroid)

Only the training sample and one shard are in memory at once, so assignment scales with the shard
count, not the pool size.
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
from curation.vectors import embedding_array, embedding_matrix
from pipelines.config import ClusterConfig
from pipelines.images import read_image_bytes
from pipelines.manifest import ASSIGNMENTS, CENTROIDS, EMBEDDINGS
from pipelines.shards import row_shards
from pipelines.stage import Manifest, ShardResult, StageContext, StageSpec, register_stage

SHEET_NAME = "cluster_samples.png"
SHEET_CLUSTERS = 12
SHEET_IMAGES_PER_CLUSTER = 10
KEY_COLUMNS = ("image_id", "uri")


def assign_shard(centroids: np.ndarray, rows: pa.Table) -> ShardResult:
    """Shard worker: the nearest centroid (by cosine) of every row of an embeddings slice."""
    started = time.perf_counter()
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    similarity, nearest = index.search(embedding_matrix(rows), 1)
    table = pa.table(
        {
            "image_id": rows.column("image_id"),
            "uri": rows.column("uri"),
            "cluster": pa.array(nearest[:, 0].astype(np.int32)),
            "similarity": pa.array(similarity[:, 0].astype(np.float32)),
        }
    )
    seconds = round(time.perf_counter() - started, 3)
    return ShardResult(
        tables={"assignments": table}, stats={"assigned_rows": rows.num_rows, "seconds": seconds}
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


def _cluster_column(ctx: StageContext) -> np.ndarray:
    """Every row's cluster id, read one column of one part at a time."""
    directory = ctx.store.output_dir(ctx.spec.name, ctx.key, "assignments")
    columns = []
    for part in ctx.store.list_parts(directory):
        with ctx.store.fs.open(part, "rb") as handle:
            columns.append(np.asarray(pq.read_table(handle, columns=["cluster"]).column("cluster")))
    return np.concatenate(columns) if columns else np.zeros(0, np.int32)


def _samples_sheet(ctx: StageContext, largest: list[int]) -> bytes:
    """One row per cluster (largest first): its members nearest to the centroid."""
    wanted = pa.array(largest, pa.int32())
    directory = ctx.store.output_dir(ctx.spec.name, ctx.key, "assignments")
    picked: dict[int, list[tuple[float, str]]] = {cluster: [] for cluster in largest}
    for part in ctx.store.list_parts(directory):
        with ctx.store.fs.open(part, "rb") as handle:
            table = pq.read_table(handle, columns=["uri", "cluster", "similarity"])
        table = table.filter(pc.is_in(table.column("cluster"), wanted))
        for row in table.to_pylist():
            picked[row["cluster"]].append((-row["similarity"], row["uri"]))
    rows = []
    for cluster in largest:
        members = sorted(picked[cluster])[:SHEET_IMAGES_PER_CLUSTER]
        rows.append([uri_tile(uri, f"c{cluster} {-score:.2f}") for score, uri in members])
    return contact_sheet(rows, "k-means clusters, largest first (cosine to centroid)")


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
    table = inputs["embeddings"].read(EMBEDDINGS)
    table = table.filter(pc.is_in(table.column("role"), pa.array(list(cfg.roles), pa.string())))
    # Shards are sorted by key, so the seeded sample below does not depend on the order in which the
    # upstream parts were written; sampling from the shards' rows saves a second sort.
    shards = row_shards(table.select([*KEY_COLUMNS, "embedding"]), cfg.rows_per_shard, KEY_COLUMNS)
    num_rows = table.num_rows
    del table
    if num_rows == 0:
        ctx.write_output("centroids", CENTROIDS.empty_table())
        ctx.write_output("assignments", ASSIGNMENTS.empty_table())
        return {"rows": 0, "clusters": 0}
    num_clusters = min(cfg.num_clusters, num_rows)
    train_rows = min(num_rows, num_clusters * cfg.max_points_per_centroid)
    sample = np.sort(np.random.default_rng(cfg.seed).choice(num_rows, train_rows, replace=False))
    vectors = embedding_matrix(pa.concat_tables([shard.payload for shard in shards]).take(sample))
    timings["read_and_sample"] = time.perf_counter() - started

    started = time.perf_counter()
    centroids = train_centroids(vectors, num_clusters, cfg)
    del vectors
    timings["train"] = time.perf_counter() - started

    started = time.perf_counter()
    ctx.map_shards(functools.partial(assign_shard, centroids), shards, outputs=["assignments"])
    timings["assign"] = time.perf_counter() - started

    started = time.perf_counter()
    sizes = np.bincount(_cluster_column(ctx), minlength=num_clusters)
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
    ctx.write_artifact(SHEET_NAME, _samples_sheet(ctx, largest))
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
