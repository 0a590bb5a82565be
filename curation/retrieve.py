"""The `retrieve` stage: pool images near each curated seed set (paper Sec. 3, App. A.4).

pool    = embeddings rows with role `uncurated` that the cluster stage assigned (the decontaminated pool),
          held as row ids (`retrieval_pool`): its vectors fill the index a block at a time, and a search
          shard reads the keys of the pool rows it hit; the driver holds 16 bytes a pool row
queries = embeddings rows whose `source` is a configured seed source, in key order (held: the seed sets)
sample mode:  queries --key-sorted shards of rows_per_shard--> ctx.map_shards(search_shard): the N pool
              images nearest to each query (cosine; exact Faiss, or IVF from ivf_min_rows), one
              `neighbours` part per shard (resumable; every worker holds the pool index once, or with
              search.shards > 1 the index is split over the executor's workers and the query shards
              run from here, each searching all of them: see curation.search.sharded)
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
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.cluster import ASSIGNMENTS, CENTROIDS, uri_tile
from curation.embed import EMBEDDINGS
from curation.hits import (
    RETRIEVED,
    cluster_hits,
    hits_table,
    keep_once,
    nearest_centroids,
    sample_hits,
    sample_retrievals,
)
from curation.pictures import Tile, contact_sheet
from curation.retrieval_pool import Pool, assigned_pool
from curation.search import SearchConfig, database_index
from curation.search.knn import Searcher
from curation.search.sharded import SINGLE_INDEX
from curation.vectors import RowVectors, embedding_matrix, vector_shards
from pipelines.executor import SerialExecutor
from pipelines.manifest import ROW_KEY_COLUMNS, ManifestSchema
from pipelines.partitions import KeyRanges, stage_key_ranges
from pipelines.stage import Manifest, Shard, ShardResult, StageContext, StageSpec, register_stage
from pipelines.validation import require

POOL_ROLE = "uncurated"
# Query shards are keyed by seed source too, so each shard (and its id) holds one source's queries.
QUERY_KEY_COLUMNS = ("source", *ROW_KEY_COLUMNS)
SAMPLE_MODE = "sample"
SHEET_NAME = "retrieval_examples.png"
SHEET_QUERIES = 6
SHEET_NEIGHBOURS = 8
PART_ID_LENGTH = 16

RetrievalMode = Literal["sample", "cluster"]
CollisionPolicy = Literal["keep_once", "multiplicity"]
# Paper values: N = 4 nearest per query image (32 for ImageNet-1k); clusters with more than 3 query hits
# give 10,000 images each, at most 1M per seed set.
PAPER_NEIGHBOURS_PER_QUERY = 4
PAPER_MIN_QUERY_HITS = 3
PAPER_IMAGES_PER_CLUSTER = 10_000
PAPER_MAX_IMAGES_PER_SOURCE = 1_000_000


@dataclass(frozen=True, kw_only=True, slots=True)
class RetrievalSourceConfig:
    source: str
    """Name of a curated ingest source whose images are the queries."""
    mode: RetrievalMode = "sample"
    num_neighbours: int = PAPER_NEIGHBOURS_PER_QUERY
    """sample mode: pool images retrieved per query image."""
    min_query_hits: int = PAPER_MIN_QUERY_HITS
    """cluster mode: a cluster qualifies with more than this many query images."""
    images_per_cluster: int = PAPER_IMAGES_PER_CLUSTER
    max_images: int = PAPER_MAX_IMAGES_PER_SOURCE

    def __post_init__(self) -> None:
        require(self.num_neighbours >= 1, f"num_neighbours must be >= 1, got {self.num_neighbours}")
        require(self.min_query_hits >= 0, f"min_query_hits must be >= 0, got {self.min_query_hits}")
        require(self.images_per_cluster >= 1, "images_per_cluster must be >= 1")
        require(self.max_images >= 1, f"max_images must be >= 1, got {self.max_images}")


@dataclass(frozen=True, kw_only=True, slots=True)
class RetrieveConfig:
    sources: tuple[RetrievalSourceConfig, ...] = ()
    collisions: CollisionPolicy = "multiplicity"
    """A pool image retrieved by several queries: once, or once per retrieval (the paper's counts)."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """The pool's index: one per run, searched by every sample-mode source."""
    seed: int = 0
    rows_per_shard: int = 65_536
    """Sample mode: queries per search shard, the unit of fan-out and resume."""

    def __post_init__(self) -> None:
        names = [source.source for source in self.sources]
        require(len(names) == len(set(names)), f"retrieval sources must be unique, got {names}")
        require(self.rows_per_shard >= 1, f"rows_per_shard must be >= 1, got {self.rows_per_shard}")


# One row per seed source and mode, as the paper's Table 15: retrieve's `summary` and assemble's table.
COMPOSITION = ManifestSchema(
    name="composition",
    version=1,
    fields=(
        pa.field("seed_source", pa.string(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),  # as_is | sample | cluster
        pa.field("seed_images", pa.int64(), nullable=False),  # the paper's "Images" column
        pa.field("retrieved", pa.int64()),  # before the per-source cap; null for as_is
        pa.field("final", pa.int64(), nullable=False),  # rows in the curated manifest
    ),
)


@dataclass(frozen=True, slots=True)
class PoolSearch:
    """What every search worker holds once: the pool's index and where its rows lie."""

    searcher: Searcher
    pool: Pool


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
    described = search.pool.describe(hits.pool)
    table = hits_table(hits, described, shard.queries.keys, shard.seed_source, SAMPLE_MODE)
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


def source_queries(embeddings: KeyRanges, source: str) -> pa.Table:
    """The rows of seed source `source`, in key order (only they are read)."""
    rows = np.flatnonzero(embeddings.column_is_in("source", [source]))
    queries = EMBEDDINGS.validate(embeddings.offsets.read_rows(rows, EMBEDDINGS.names))
    if pc.any(pc.equal(queries.column("role"), POOL_ROLE)).as_py():
        # Why: its images are also in the pool, so each query would retrieve itself.
        raise ValueError(f"retrieval source {source!r} is an uncurated (pool) source")
    return queries


def retrieve_source(
    source: RetrievalSourceConfig,
    cfg: RetrieveConfig,
    queries: pa.Table,
    pool: Pool,
    neighbours: pa.Table,
    centroids: np.ndarray,
) -> tuple[pa.Table, dict[str, Any]]:
    """The `retrieved` rows of one seed source (sample mode: from its `neighbours` rows) and its stats."""
    started = time.perf_counter()
    clusters_used = 0
    keep_best_only = cfg.collisions == "keep_once"
    if source.mode == SAMPLE_MODE:
        found = sample_retrievals(
            neighbours.filter(pc.equal(neighbours.column("seed_source"), source.source)), keep_best_only
        )
        table, retrievals, before_cap = found.table, found.retrievals, found.retrievals
        unique, collisions = found.unique_pool_images, found.collisions
    else:
        query_vectors = embedding_matrix(queries)
        query_clusters = nearest_centroids(query_vectors, centroids) if len(query_vectors) else np.zeros(0)
        clusters, centroid_similarity = pool.clusters()
        hits, clusters_used, before_cap = cluster_hits(
            query_clusters.astype(np.int64), clusters, centroid_similarity, source, cfg.seed
        )
        del clusters, centroid_similarity
        counts = np.bincount(hits.pool, minlength=len(pool))
        retrievals, unique, collisions = len(hits.pool), int((counts > 0).sum()), int((counts > 1).sum())
        del counts
        if keep_best_only:
            hits = keep_once(hits)
        table = hits_table(hits, pool.describe(hits.pool), queries, source.source, source.mode)
    stats = {
        "mode": source.mode,
        "queries": queries.num_rows,
        "retrievals": retrievals,
        "retrieved_before_cap": before_cap,
        "unique_pool_images": unique,
        "collisions": collisions,
        "clusters_used": clusters_used,
        "rows": table.num_rows,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return table, stats


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


def search_queries(ctx: StageContext, cfg: RetrieveConfig, shards: list[Shard], pool: Pool) -> dict[str, Any]:
    """Writes every query shard's `neighbours` part; returns the shards' summed stats.

    The pool's index (one for every sample-mode source: an IVF build costs more than its searches) is
    built only when there are queries, and lives only in here: the rest of the stage runs without it.
    """
    # Why: a sharded index already spreads each search over the executor's workers, and query shards
    # fanned out to workers of their own could wait forever for the CPUs the index shards hold.
    runner = ctx if cfg.search.shards == SINGLE_INDEX else dataclasses.replace(ctx, executor=SerialExecutor())
    index = database_index(pool.vectors(), cfg.search, ctx.executor) if shards else nullcontext(None)
    with index as searcher:
        return runner.map_shards(
            search_shard, shards, outputs=["neighbours"], state=functools.partial(PoolSearch, searcher, pool)
        )


def run_retrieve(cfg: RetrieveConfig, inputs: Mapping[str, Manifest], ctx: StageContext) -> dict[str, Any]:
    embeddings = stage_key_ranges(ctx, "embeddings", inputs["embeddings"].uri, EMBEDDINGS)
    assignments = stage_key_ranges(ctx, "assignments", inputs["assignments"].uri, ASSIGNMENTS)
    pool = assigned_pool(embeddings, assignments, [POOL_ROLE])
    queries = {source.source: source_queries(embeddings, source.source) for source in cfg.sources}
    shards = [
        shard
        for source in cfg.sources
        if source.mode == SAMPLE_MODE
        for shard in query_shards(source, queries[source.source], cfg.rows_per_shard)
    ]
    search_stats = search_queries(ctx, cfg, shards, pool)
    neighbours = ctx.read_output("neighbours")
    centroids_table = inputs["centroids"].read(CENTROIDS).sort_by("cluster")
    centroids = embedding_matrix(centroids_table, "centroid")
    per_source: dict[str, Any] = {}
    summary = []
    examples = []
    for source in cfg.sources:
        if not queries[source.source].num_rows:
            ctx.warn(f"no embeddings of source {source.source!r}: nothing retrieved")
        elif source.mode == SAMPLE_MODE and source.num_neighbours > len(pool):
            ctx.warn(
                f"{source.source}: num_neighbours {source.num_neighbours} capped at the {len(pool)} "
                "pool images"
            )
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
        "pool_rows": len(pool),
        "query_shards": len(shards),
        "rows": sum(stats["rows"] for stats in per_source.values()),
        "sources": per_source,
    }


RETRIEVE = register_stage(
    StageSpec(
        name="retrieve",
        # 3: the pool is read where it lies (`retrieval_pool`); rows and outputs as before
        version=3,
        config_type=RetrieveConfig,
        fn=run_retrieve,
        inputs={"embeddings": EMBEDDINGS, "assignments": ASSIGNMENTS, "centroids": CENTROIDS},
        outputs={"neighbours": RETRIEVED, "retrieved": RETRIEVED, "summary": COMPOSITION},
        description="pool images near each seed set: N nearest per query, or samples of its clusters",
        shown_stats={"pool_rows": "pool images", "rows": "retrieved rows"},
    )
)
