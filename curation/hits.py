"""Retrievals as row indices, how each mode picks them, and the `retrieved` rows they become.

sample mode:  queries --knn_search over the pool index--> the N nearest pool rows per query, nearest first
cluster mode: each query's nearest centroid --clusters with more than T queries--> up to M pool rows of
              each (a seeded sample, ranked by cosine to the centroid) --> a seeded cap per source
collisions:   `keep_once` keeps one hit per pool row (its best); otherwise every hit stays
`hits_table` --> RETRIEVED rows (the hit pool rows described by `retrieval_pool.Pool.describe`)
sample mode's `neighbours` rows --`sample_retrievals`--> one source's rows in search order, or its best one
              per pool image; counted by image (no pool table needed)
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import faiss
import numpy as np
import pyarrow as pa

from curation.search.knn import Searcher, knn_search
from pipelines.manifest import ManifestSchema

if TYPE_CHECKING:
    from curation.retrieve import RetrievalSourceConfig

RETRIEVED = ManifestSchema(
    name="retrieved",
    version=1,
    fields=(
        pa.field("image_id", pa.string(), nullable=False),  # the pool image
        pa.field("uri", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # the pool image's source
        pa.field("seed_source", pa.string(), nullable=False),  # the curated source that retrieved it
        pa.field("mode", pa.string(), nullable=False),  # sample | cluster
        pa.field("query_image_id", pa.string()),  # sample mode: the seed image; null in cluster mode
        pa.field("query_uri", pa.string()),
        pa.field("similarity", pa.float32(), nullable=False),  # cosine to the query (sample) or centroid
        pa.field("rank", pa.int32(), nullable=False),  # 0 = nearest; cluster mode: rank within the cluster
        pa.field("cluster", pa.int32(), nullable=False),  # the pool image's k-means cluster
    ),
)


@dataclass(frozen=True, slots=True)
class Hits:
    """Retrievals as row indices: pool row, query row (-1: none), similarity, rank."""

    pool: np.ndarray
    query: np.ndarray
    similarity: np.ndarray
    rank: np.ndarray

    def take(self, rows: np.ndarray) -> Hits:
        return Hits(self.pool[rows], self.query[rows], self.similarity[rows], self.rank[rows])


def sample_hits(queries: np.ndarray, searcher: Searcher, num_neighbours: int) -> Hits:
    """The `num_neighbours` nearest pool rows of every query, query by query, nearest first."""
    similarity, neighbours = knn_search(searcher, queries, num_neighbours)
    query, rank = np.nonzero(neighbours >= 0)  # IVF leaves -1 where a probe found too few rows
    return Hits(
        neighbours[query, rank], query.astype(np.int64), similarity[query, rank], rank.astype(np.int64)
    )


def keep_once(hits: Hits) -> Hits:
    """One hit per pool row: the most similar (then lowest rank, then first query)."""
    order = np.lexsort((hits.query, hits.rank, -hits.similarity, hits.pool))
    ordered = hits.take(order)
    first = np.ones(len(order), dtype=bool)
    first[1:] = ordered.pool[1:] != ordered.pool[:-1]
    return ordered.take(np.flatnonzero(first))


def nearest_centroids(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)[1][:, 0]


def cluster_hits(
    query_clusters: np.ndarray,
    clusters: np.ndarray,
    centroid_similarity: np.ndarray,
    source: RetrievalSourceConfig,
    seed: int,
) -> tuple[Hits, int, int]:
    """Pool rows of every cluster with more than `min_query_hits` queries, capped per cluster and source;
    `clusters` and `centroid_similarity` are per pool row.

    Returns the hits, the clusters used, and the count before the per-source cap.
    """
    num_clusters = int(max(clusters.max(initial=-1), query_clusters.max(initial=-1))) + 1
    hits_per_cluster = np.bincount(query_clusters, minlength=num_clusters)
    used = np.flatnonzero(hits_per_cluster > source.min_query_hits)
    # Per-source stream: adding or removing a source leaves the others' samples unchanged.
    rng = np.random.default_rng([seed, zlib.crc32(source.source.encode())])
    order = np.argsort(clusters, kind="stable")
    bounds = np.searchsorted(clusters[order], np.stack([used, used + 1]))
    picked, ranks = [], []
    for start, stop in bounds.T:
        members = order[start:stop]
        if len(members) > source.images_per_cluster:
            members = rng.choice(members, source.images_per_cluster, replace=False)
        members = members[np.argsort(-centroid_similarity[members], kind="stable")]
        picked.append(members)
        ranks.append(np.arange(len(members)))
    rows = np.concatenate(picked) if picked else np.zeros(0, np.int64)
    rank = np.concatenate(ranks) if ranks else np.zeros(0, np.int64)
    before_cap = len(rows)
    if before_cap > source.max_images:
        keep = np.sort(rng.choice(before_cap, source.max_images, replace=False))
        rows, rank = rows[keep], rank[keep]
    hits = Hits(rows, np.full(len(rows), -1, np.int64), centroid_similarity[rows], rank)
    return hits, len(used), before_cap


def hits_table(hits: Hits, described: pa.Table, queries: pa.Table, seed_source: str, mode: str) -> pa.Table:
    """RETRIEVED rows for `hits`; `described` holds each hit's pool row (`Pool.describe(hits.pool)`)."""
    has_query = hits.query >= 0
    query_rows = pa.array(np.where(has_query, hits.query, 0), mask=~has_query)
    return RETRIEVED.validate(
        pa.table(
            {
                "image_id": described.column("image_id"),
                "uri": described.column("uri"),
                "source": described.column("source"),
                "seed_source": pa.array([seed_source] * len(hits.pool), pa.string()),
                "mode": pa.array([mode] * len(hits.pool), pa.string()),
                "query_image_id": queries.column("image_id").take(query_rows),
                "query_uri": queries.column("uri").take(query_rows),
                "similarity": pa.array(hits.similarity.astype(np.float32)),
                "rank": pa.array(hits.rank.astype(np.int32)),
                "cluster": described.column("cluster"),
            }
        )
    )


@dataclass(frozen=True, slots=True)
class SampleRetrievals:
    """One sample-mode source's `retrieved` rows and how its hits fell on pool images."""

    table: pa.Table
    retrievals: int
    unique_pool_images: int
    collisions: int  # pool images retrieved more than once


def sample_retrievals(neighbours: pa.Table, keep_best_only: bool) -> SampleRetrievals:
    """One source's `neighbours` rows query by query (in key order), nearest first; with `keep_best_only`,
    one row per pool image: its most similar (then lowest rank, then first query), by pool image key.

    The order is the one a single search over all the queries gives, whichever order the parts come in.
    """
    by_query = neighbours.sort_by(
        [("query_image_id", "ascending"), ("query_uri", "ascending"), ("rank", "ascending")]
    )
    by_image = neighbours.sort_by(
        [
            ("image_id", "ascending"),
            ("uri", "ascending"),
            ("similarity", "descending"),
            ("rank", "ascending"),
            ("query_image_id", "ascending"),
            ("query_uri", "ascending"),
        ]
    )
    ids = np.asarray(by_image.column("image_id").to_numpy(zero_copy_only=False), dtype=object)
    uris = np.asarray(by_image.column("uri").to_numpy(zero_copy_only=False), dtype=object)
    first = np.ones(len(ids), dtype=bool)
    first[1:] = (ids[1:] != ids[:-1]) | (uris[1:] != uris[:-1])
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, len(ids)))
    table = by_image.filter(pa.array(first)) if keep_best_only else by_query
    return SampleRetrievals(table, neighbours.num_rows, len(starts), int((counts > 1).sum()))
