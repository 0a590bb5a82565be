"""The `cluster` stage: spherical (cosine) k-means of the pool's embeddings, in bounded memory.

embeddings (key ranges: `pipelines.partitions`) --role column, part by part--> rows of cfg.roles as global
   row ids (key order; 8 bytes a row, never a key)
   --seeded sample (<= k * max_points_per_centroid rows): only those rows' embeddings read--> unit float32
   --faiss.Kmeans(spherical)--> centroids
   --ctx.map_shards over partitions: each worker reads its own rows' keys and embeddings from the parts
     (unless the sample was every row: then shards view it), nearest centroid of each row--> assignments
   --part by part: cluster sizes, then the members nearest the largest clusters' centroids--> centroids
     (cluster, size, centroid), the picture

Memory: the role rows' ids, the training sample and the centroids; a shard worker adds one shard's rows.
Beyond the sample's cap no copy of the embeddings is ever held, so the pool can outgrow one machine.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.embed import EMBEDDINGS
from curation.pictures import Tile, contact_sheet
from curation.search.knn import faiss_gpus, nearest_centroid
from curation.vector_parts import ChosenRows, RoleRows, role_rows
from curation.vectors import embedding_array
from pipelines.images import read_image_bytes
from pipelines.manifest import EMBEDDING, ManifestSchema, Role
from pipelines.partitions import stage_key_ranges
from pipelines.stage import Manifest, ShardResult, StageContext, StageSpec, register_stage
from pipelines.validation import require

SHEET_NAME = "cluster_samples.png"
SHEET_CLUSTERS = 12
SHEET_IMAGES_PER_CLUSTER = 10
# The paper clusters the pool into 100,000 clusters; a k-means sample of this many points per centroid
# bounds training memory (Faiss's own default cap).
PAPER_NUM_CLUSTERS = 100_000
DEFAULT_POINTS_PER_CENTROID = 256


@dataclass(frozen=True, kw_only=True, slots=True)
class ClusterConfig:
    num_clusters: int = PAPER_NUM_CLUSTERS
    max_points_per_centroid: int = DEFAULT_POINTS_PER_CENTROID
    """k-means trains on at most num_clusters * this many sampled vectors; all vectors are assigned."""
    num_iterations: int = 20
    roles: tuple[Role, ...] = ("uncurated",)
    seed: int = 0
    rows_per_shard: int = 65_536
    """Assignment shard size: memory stays bounded by one shard plus the centroids."""
    use_gpu: bool = True
    """Train and assign on the GPUs Faiss sees, if any (the `gpu` extra's faiss-gpu build); CPU otherwise."""

    def __post_init__(self) -> None:
        require(self.num_clusters >= 1, f"num_clusters must be >= 1, got {self.num_clusters}")
        require(self.max_points_per_centroid >= 1, "max_points_per_centroid must be >= 1")
        require(self.num_iterations >= 1, f"num_iterations must be >= 1, got {self.num_iterations}")
        require(self.rows_per_shard >= 1, f"rows_per_shard must be >= 1, got {self.rows_per_shard}")


CENTROIDS = ManifestSchema(
    name="centroids",
    version=1,
    fields=(
        pa.field("cluster", pa.int32(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),  # rows assigned to it (all rows, not the sample)
        pa.field("centroid", EMBEDDING, nullable=False),  # L2-normalised (spherical k-means)
    ),
)

ASSIGNMENTS = ManifestSchema(
    name="assignments",
    version=1,
    fields=(
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("cluster", pa.int32(), nullable=False),  # nearest centroid by cosine
        pa.field("similarity", pa.float32(), nullable=False),  # cosine to that centroid
    ),
)


def assign_shard(centroids: np.ndarray, use_gpu: bool, rows: ChosenRows) -> ShardResult:
    """Shard worker: reads its rows' keys and embeddings, and finds the nearest centroid (by cosine) of
    each (on the worker's GPUs when asked and present)."""
    started = time.perf_counter()
    keys = rows.read_keys()
    nearest, similarity = nearest_centroid(rows.unit_rows(), centroids, use_gpu)
    table = pa.table(
        {
            "image_id": keys.column("image_id"),
            "uri": keys.column("uri"),
            "cluster": pa.array(nearest.astype(np.int32)),
            "similarity": pa.array(similarity.astype(np.float32)),
        }
    )
    seconds = round(time.perf_counter() - started, 3)
    return ShardResult(
        tables={"assignments": table}, stats={"assigned_rows": keys.num_rows, "seconds": seconds}
    )


def train_centroids(vectors: np.ndarray, num_clusters: int, cfg: ClusterConfig) -> np.ndarray:
    """Spherical k-means centroids [k, d] (unit length) of `vectors`, on GPU when asked and present."""
    kmeans = faiss.Kmeans(
        vectors.shape[1],
        num_clusters,
        niter=cfg.num_iterations,
        spherical=True,
        seed=cfg.seed,
        max_points_per_centroid=cfg.max_points_per_centroid,
        gpu=faiss_gpus(cfg.use_gpu) > 0,
        verbose=False,
    )
    kmeans.train(np.ascontiguousarray(vectors, dtype=np.float32))
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def cluster_sizes(fs: fsspec.AbstractFileSystem, parts: list[str], num_clusters: int) -> np.ndarray:
    """Rows per cluster [k] int64, from the cluster column of assignments `parts`, one part at a time."""
    sizes = np.zeros(num_clusters, np.int64)
    for part in parts:
        clusters = pq.read_table(part, filesystem=fs, columns=["cluster"]).column("cluster")
        sizes += np.bincount(np.asarray(clusters), minlength=num_clusters)
    return sizes


def _nearest_first(members: pa.Table) -> pa.Table:
    """Members by cluster, nearest to the centroid first; at most SHEET_IMAGES_PER_CLUSTER per cluster."""
    members = members.sort_by([("cluster", "ascending"), ("similarity", "descending"), ("uri", "ascending")])
    clusters = np.asarray(members.column("cluster"))
    rank = np.arange(len(clusters)) - np.searchsorted(clusters, clusters)  # position within its cluster
    return members.filter(pa.array(rank < SHEET_IMAGES_PER_CLUSTER))


def sheet_members(fs: fsspec.AbstractFileSystem, parts: list[str], largest: list[int]) -> pa.Table:
    """The members of the `largest` clusters nearest their centroids, from assignments `parts`.

    Only the best so far are kept after each part. The sort is stable and earlier parts' rows come
    first, so ties resolve as in one sort of all parts.
    """
    wanted = pa.array(largest, pa.int32())
    best = ASSIGNMENTS.empty_table().select(["cluster", "similarity", "uri"])
    for part in parts:
        table = pq.read_table(part, filesystem=fs, columns=["cluster", "similarity", "uri"])
        members = table.filter(pc.is_in(table.column("cluster"), wanted))
        best = _nearest_first(pa.concat_tables([best, members]))
    return best


def _samples_sheet(members: pa.Table, largest: list[int]) -> bytes:
    """One row per cluster (largest first): its members nearest to the centroid."""
    picked: dict[int, list[Tile]] = {cluster: [] for cluster in largest}
    for row in members.to_pylist():
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


def pool_rows(
    ctx: StageContext, embeddings: Manifest, roles: Sequence[Role], rows_per_shard: int
) -> RoleRows:
    """The embeddings rows of `roles`, in key order (a seeded sample of them must not depend on how
    upstream wrote parts), as global row ids: the driver holds 8 bytes a row, never a key."""
    ranges = stage_key_ranges(ctx, "embeddings", embeddings.uri, EMBEDDINGS, rows_per_shard)
    return role_rows(ranges, roles)


def seeded_sample(num_rows: int, count: int, seed: int) -> np.ndarray:
    """Sorted positions of `count` rows of `num_rows`, drawn without replacement (all when count >= it)."""
    if count >= num_rows:
        return np.arange(num_rows)
    return np.sort(np.random.default_rng(seed).choice(num_rows, count, replace=False))


def run_cluster(cfg: ClusterConfig, inputs: Mapping[str, Manifest], ctx: StageContext) -> dict[str, Any]:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    rows = pool_rows(ctx, inputs["embeddings"], cfg.roles, cfg.rows_per_shard)
    num_rows = len(rows)
    if num_rows == 0:
        ctx.write_output("centroids", CENTROIDS.empty_table())
        ctx.write_output("assignments", ASSIGNMENTS.empty_table())
        return {"rows": 0, "clusters": 0}
    num_clusters = min(cfg.num_clusters, num_rows)
    train_rows = min(num_rows, num_clusters * cfg.max_points_per_centroid)
    training = rows.read_unit_rows(seeded_sample(num_rows, train_rows, cfg.seed))
    timings["read_and_sample"] = time.perf_counter() - started

    started = time.perf_counter()
    centroids = train_centroids(training, num_clusters, cfg)
    # A sample of every row is every row in key order, within the sample's memory cap: no second read.
    loaded = training if train_rows == num_rows else None
    del training
    timings["train"] = time.perf_counter() - started

    started = time.perf_counter()
    shards = rows.shards(cfg.rows_per_shard, loaded)
    del loaded
    ctx.map_shards(functools.partial(assign_shard, centroids, cfg.use_gpu), shards, outputs=["assignments"])
    timings["assign"] = time.perf_counter() - started

    started = time.perf_counter()
    parts = ctx.store.list_parts(ctx.store.output_dir(ctx.spec.name, ctx.key, "assignments"))
    sizes = cluster_sizes(ctx.store.fs, parts, num_clusters)
    ctx.write_output(
        "centroids",
        pa.table(
            {
                "cluster": pa.array(np.arange(num_clusters, dtype=np.int32)),
                "size": pa.array(sizes),
                "centroid": embedding_array(centroids),
            }
        ),
    )
    largest = [int(c) for c in np.argsort(-sizes, kind="stable")[:SHEET_CLUSTERS] if sizes[c] > 0]
    ctx.write_artifact(SHEET_NAME, _samples_sheet(sheet_members(ctx.store.fs, parts, largest), largest))
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
        ctx.warn(f"num_clusters {cfg.num_clusters} capped at the {num_rows} rows to cluster")
    return stats


CLUSTER = register_stage(
    StageSpec(
        name="cluster",
        # 2: assignment shards are the partitions of every row (`pipelines.partitions`), not of role rows
        version=2,
        config_type=ClusterConfig,
        fn=run_cluster,
        inputs={"embeddings": EMBEDDINGS},
        outputs={"centroids": CENTROIDS, "assignments": ASSIGNMENTS},
        description="spherical k-means on a seeded sample, every row assigned to its nearest centroid",
        shown_stats={"clusters": "clusters", "rows": "images", "empty_clusters": "empty clusters"},
    )
)
