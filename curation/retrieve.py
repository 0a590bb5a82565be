"""The `retrieve` stage: pool images near each curated seed set (paper Sec. 3, App. A.4).

pool    = embeddings rows with role `uncurated` that the cluster stage assigned (the decontaminated pool)
queries = embeddings rows whose `source` is a configured seed source, sorted by key
sample mode:  queries --key-sorted shards of rows_per_shard--> ctx.map_shards(search_shard): the N pool
              images nearest to each query (cosine; exact Faiss, or IVF from ivf_min_rows), one
              `neighbours` part per shard (resumable; every worker holds the pool index once, or with
              search_shards > 1 the index is split over the executor's workers and the query shards
              run from here, each searching all of them: see curation.sharded_knn)
              --per source: the shards' parts read back--> collision policy --> `retrieved`
cluster mode: queries go to their nearest centroid; every cluster holding more than T queries gives up
              to M of its pool images (a seeded random sample, as the paper's "sample M images"),
              then a seeded sample caps the source at max_images (one step: it needs all the queries)
collisions:   one pool image retrieved by several queries of a source is counted; `keep_once` keeps its
              best retrieval, `multiplicity` keeps every retrieval (the paper's counts are exact multiples)

Outputs: `neighbours` (sample mode, before the collision policy, one part per query shard), `retrieved`
(one part per seed source) and `summary` (per source: queries, retrieved before the cap, rows kept),
which `assemble` turns into the composition table.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
import zlib
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.cluster import uri_tile
from curation.dedup.knn import Searcher, choose_index, knn_search
from curation.pictures import Tile, contact_sheet
from curation.sharded_knn import SINGLE_INDEX, database_index
from curation.vectors import RowVectors, embedding_matrix, vector_shards
from pipelines.config import RetrievalSourceConfig, RetrieveConfig
from pipelines.executor import SerialExecutor
from pipelines.manifest import ASSIGNMENTS, CENTROIDS, COMPOSITION, EMBEDDINGS, RETRIEVED, align_rows
from pipelines.stage import Manifest, Shard, ShardResult, StageContext, StageSpec, register_stage

POOL_ROLE = "uncurated"
KEY_COLUMNS = ("image_id", "uri")
# Query shards are keyed by seed source too, so each shard (and its id) holds one source's queries.
QUERY_KEY_COLUMNS = ("source", *KEY_COLUMNS)
QUERY_COLUMNS = {"query_image_id": "image_id", "query_uri": "uri"}
SAMPLE_MODE = "sample"
SHEET_NAME = "retrieval_examples.png"
SHEET_QUERIES = 6
SHEET_NEIGHBOURS = 8
PART_ID_LENGTH = 16


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([(name, "ascending") for name in KEY_COLUMNS])


def load_pool(embeddings: pa.Table, assignments: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """Pool rows (sorted by key) with their cluster and centroid similarity, and their unit vectors.

    Only rows the cluster stage assigned count: the pool is exactly what was clustered.
    """
    pool = _sorted(embeddings.filter(pc.equal(embeddings.column("role"), POOL_ROLE)))
    wanted = pool.select(list(KEY_COLUMNS)).append_column("_row", pa.array(np.arange(pool.num_rows)))
    joined = wanted.join(assignments, list(KEY_COLUMNS), join_type="inner").sort_by("_row")
    pool = pool.take(np.asarray(joined.column("_row"), dtype=np.int64))
    vectors = embedding_matrix(pool)
    pool = pool.drop_columns(["embedding"]).append_column("cluster", joined.column("cluster"))
    return pool.append_column("centroid_similarity", joined.column("similarity")), vectors


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
    pool: pa.Table,
    source: RetrievalSourceConfig,
    seed: int,
) -> tuple[Hits, int, int]:
    """Pool rows of every cluster with more than `min_query_hits` queries, capped per cluster and source.

    Returns the hits, the clusters used, and the count before the per-source cap.
    """
    clusters = np.asarray(pool.column("cluster"), dtype=np.int64)
    centroid_similarity = np.asarray(pool.column("centroid_similarity"), dtype=np.float32)
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


def hits_table(hits: Hits, pool: pa.Table, queries: pa.Table, seed_source: str, mode: str) -> pa.Table:
    has_query = hits.query >= 0
    query_rows = pa.array(np.where(has_query, hits.query, 0), mask=~has_query)
    return RETRIEVED.validate(
        pa.table(
            {
                "image_id": pool.column("image_id").take(hits.pool),
                "uri": pool.column("uri").take(hits.pool),
                "source": pool.column("source").take(hits.pool),
                "seed_source": pa.array([seed_source] * len(hits.pool), pa.string()),
                "mode": pa.array([mode] * len(hits.pool), pa.string()),
                "query_image_id": queries.column("image_id").take(query_rows),
                "query_uri": queries.column("uri").take(query_rows),
                "similarity": pa.array(hits.similarity.astype(np.float32)),
                "rank": pa.array(hits.rank.astype(np.int32)),
                "cluster": pool.column("cluster").take(hits.pool),
            }
        )
    )


@dataclass(frozen=True, slots=True)
class PoolSearch:
    """What every search worker holds once: the pool's index and its rows (keys, source, cluster)."""

    searcher: Searcher
    pool: pa.Table


@dataclass(frozen=True, slots=True)
class QueryShard:
    """One search shard: a run of one seed source's key-sorted queries."""

    seed_source: str
    num_neighbours: int
    queries: RowVectors


def search_shard(search: PoolSearch, shard: QueryShard) -> ShardResult:
    """Shard worker: the `num_neighbours` nearest pool rows of every query, as `neighbours` rows."""
    started = time.perf_counter()
    hits = sample_hits(shard.queries.vectors, search.searcher, shard.num_neighbours)
    table = hits_table(hits, search.pool, shard.queries.keys, shard.seed_source, SAMPLE_MODE)
    seconds = round(time.perf_counter() - started, 3)
    stats = {shard.seed_source: {"queries": shard.queries.keys.num_rows, "search_seconds": seconds}}
    return ShardResult(tables={"neighbours": table}, stats=stats)


def query_shards(source: RetrievalSourceConfig, queries: pa.Table, rows_per_shard: int) -> list[Shard]:
    """Content-keyed shards of one sample-mode source's queries (sorted by key, see `source_queries`)."""
    keys = queries.select(list(QUERY_KEY_COLUMNS))
    return [
        Shard(shard.shard_id, QueryShard(source.source, source.num_neighbours, shard.payload))
        for shard in vector_shards(keys, embedding_matrix(queries), rows_per_shard)
    ]


def neighbour_hits(neighbours: pa.Table, pool: pa.Table, queries: pa.Table) -> Hits:
    """One source's `neighbours` rows as row indices of `pool` and `queries`: query by query, nearest first.

    The order is the one a single search over all the queries gives, whichever order the parts come in.
    """
    query_keys = neighbours.select(list(QUERY_COLUMNS)).rename_columns(list(QUERY_COLUMNS.values()))
    hits = Hits(
        align_rows(neighbours, pool),
        align_rows(query_keys, queries),
        np.asarray(neighbours.column("similarity"), dtype=np.float32),
        np.asarray(neighbours.column("rank"), dtype=np.int64),
    )
    return hits.take(np.lexsort((hits.rank, hits.query)))


def source_queries(embeddings: pa.Table, source: str) -> pa.Table:
    """The rows of seed source `source`, sorted by key."""
    queries = _sorted(embeddings.filter(pc.equal(embeddings.column("source"), source)))
    if pc.any(pc.equal(queries.column("role"), POOL_ROLE)).as_py():
        # Why: its images are also in the pool, so each query would retrieve itself.
        raise ValueError(f"retrieval source {source!r} is an uncurated (pool) source")
    return queries


def retrieve_source(
    source: RetrievalSourceConfig,
    cfg: RetrieveConfig,
    queries: pa.Table,
    pool: pa.Table,
    neighbours: pa.Table,
    centroids: np.ndarray,
) -> tuple[pa.Table, dict[str, Any]]:
    """The `retrieved` rows of one seed source (sample mode: from its `neighbours` rows) and its stats."""
    started = time.perf_counter()
    clusters_used = 0
    if source.mode == SAMPLE_MODE:
        found = neighbours.filter(pc.equal(neighbours.column("seed_source"), source.source))
        hits = neighbour_hits(found, pool, queries)
        before_cap = len(hits.pool)
    else:
        query_vectors = embedding_matrix(queries)
        query_clusters = nearest_centroids(query_vectors, centroids) if len(query_vectors) else np.zeros(0)
        hits, clusters_used, before_cap = cluster_hits(
            query_clusters.astype(np.int64), pool, source, cfg.seed
        )
    counts = np.bincount(hits.pool, minlength=pool.num_rows)
    stats = {
        "mode": source.mode,
        "queries": queries.num_rows,
        "retrievals": len(hits.pool),
        "retrieved_before_cap": before_cap,
        "unique_pool_images": int((counts > 0).sum()),
        "collisions": int((counts > 1).sum()),
        "clusters_used": clusters_used,
    }
    if cfg.collisions == "keep_once":
        hits = keep_once(hits)
    stats["rows"] = len(hits.pool)
    if not queries.num_rows:
        stats["warning"] = f"no embeddings of source {source.source!r}: nothing retrieved"
    stats["seconds"] = round(time.perf_counter() - started, 3)
    return hits_table(hits, pool, queries, source.source, source.mode), stats


def examples_sheet(retrieved: pa.Table) -> bytes:
    """A few seed images (red frame), each followed by its retrieved neighbours, nearest first."""
    sample = retrieved.filter(pc.equal(retrieved.column("mode"), SAMPLE_MODE))
    queries = sorted(set(sample.column("query_uri").to_pylist()))[:SHEET_QUERIES]
    rows = []
    for query in queries:
        found = sample.filter(pc.equal(sample.column("query_uri"), query)).sort_by("rank").to_pylist()
        seed = uri_tile(query, f"seed {found[0]['seed_source']}")
        tiles = [uri_tile(row["uri"], f"#{row['rank']} {row['similarity']:.2f}") for row in found]
        rows.append([Tile(seed.data, seed.caption, highlight=True), *tiles[:SHEET_NEIGHBOURS]])
    return contact_sheet(rows, "seed images (red) and their retrieved neighbours (cosine)")


def search_queries(
    ctx: StageContext, cfg: RetrieveConfig, shards: list[Shard], searcher: Searcher | None, pool: pa.Table
) -> dict[str, Any]:
    """Writes every query shard's `neighbours` part; returns the shards' summed stats."""
    # Why: a sharded index already spreads each search over the executor's workers, and query shards
    # fanned out to workers of their own could wait forever for the CPUs the index shards hold.
    runner = ctx if cfg.search_shards == SINGLE_INDEX else dataclasses.replace(ctx, executor=SerialExecutor())
    return runner.map_shards(
        search_shard, shards, outputs=["neighbours"], state=functools.partial(PoolSearch, searcher, pool)
    )


def run_retrieve(cfg: RetrieveConfig, inputs: Mapping[str, Manifest], ctx: StageContext) -> dict[str, Any]:
    embeddings = inputs["embeddings"].read(EMBEDDINGS)
    pool, pool_vectors = load_pool(embeddings, inputs["assignments"].read(ASSIGNMENTS))
    queries = {source.source: source_queries(embeddings, source.source) for source in cfg.sources}
    del embeddings
    shards = [
        shard
        for source in cfg.sources
        if source.mode == SAMPLE_MODE
        for shard in query_shards(source, queries[source.source], cfg.rows_per_shard)
    ]
    # One index over the pool for every sample-mode source: an IVF build costs more than its searches.
    kind = choose_index(len(pool_vectors), cfg.index, cfg.ivf_min_rows)
    index = (
        database_index(pool_vectors, cfg.search_shards, kind, ctx.executor, cfg.ivf_nprobe)
        if shards
        else nullcontext(None)
    )
    del pool_vectors  # the index holds its own copy
    with index as searcher:
        search_stats = search_queries(ctx, cfg, shards, searcher, pool)
    neighbours = ctx.read_output("neighbours")
    centroids_table = inputs["centroids"].read(CENTROIDS).sort_by("cluster")
    centroids = embedding_matrix(centroids_table, "centroid")
    per_source: dict[str, Any] = {}
    summary = []
    examples = []
    for source in cfg.sources:
        table, stats = retrieve_source(source, cfg, queries[source.source], pool, neighbours, centroids)
        part = hashlib.sha256(source.source.encode()).hexdigest()[:PART_ID_LENGTH]
        ctx.write_output("retrieved", table, shard_id=part)
        if source.source in search_stats:
            stats["search_seconds"] = round(search_stats[source.source]["search_seconds"], 3)
        per_source[source.source] = stats
        summary.append(
            {
                "seed_source": source.source,
                "mode": source.mode,
                "seed_images": stats["queries"],
                "retrieved": stats["retrieved_before_cap"],
                "final": stats["rows"],
            }
        )
        if source.mode == SAMPLE_MODE and len(examples) < SHEET_QUERIES:
            examples.append(table.slice(0, SHEET_QUERIES * source.num_neighbours))
    ctx.write_output("summary", COMPOSITION.table_from_rows(summary))
    if examples:
        ctx.write_artifact(SHEET_NAME, examples_sheet(pa.concat_tables(examples)))
    return {
        "pool_rows": pool.num_rows,
        "query_shards": len(shards),
        "rows": sum(stats["rows"] for stats in per_source.values()),
        "sources": per_source,
    }


RETRIEVE = register_stage(
    StageSpec(
        name="retrieve",
        version=2,
        config_type=RetrieveConfig,
        fn=run_retrieve,
        inputs=("embeddings", "assignments", "centroids"),
        outputs={"neighbours": RETRIEVED, "retrieved": RETRIEVED, "summary": COMPOSITION},
        description="pool images near each seed set: N nearest per query, or samples of its clusters",
    )
)
