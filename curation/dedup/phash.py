"""The `phash_dedup` stage: near-duplicates by 64-bit perceptual hash within a Hamming radius.

images (key ranges: `pipelines.partitions`) --per shard: decode, imagededup hash--> hashes (every input
  row; resumable) --read back in key order: 8 bytes a row-->
  --Faiss binary range search (radius max_distance)--> pairs --union-find--> components
  --keep rule, a partition at a time (`keep`)--> images (one per component, plus protected rows),
    rejected (naming a kept row), one part per partition

The driver holds the hashes, the pairs, the labels and the resolution: numbers, never keys or URIs.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.dedup.components import (
    DEDUP_SHOWN_STATS,
    DUPLICATES_REJECTED,
    NO_MATCH,
    GroupResolution,
    KeepRuleConfig,
    component_stats,
    connected_components,
)
from curation.dedup.hamming import (
    HASH_BITS,
    HashAlgorithm,
    HashPairs,
    SearchPlan,
    hamming,
    hash_image,
    near_duplicate_pairs,
    plan_search,
)
from curation.dedup.keep import Dropped, resolve_partitioned, write_partitioned
from curation.dedup.sheets import duplicate_groups_sheet
from pipelines.images import load_rgb, read_image_bytes
from pipelines.manifest import IMAGES, ManifestSchema
from pipelines.partitions import (
    DEFAULT_ROWS_PER_PARTITION,
    KeyRanges,
    Partition,
    key_ranges,
    stage_key_ranges,
)
from pipelines.stage import Manifest, ShardResult, StageContext, StageSpec, register_stage
from pipelines.validation import require

REASON = "phash_duplicate"
SHEET_NAME = "duplicate_groups.png"
HASHES_OUTPUT = "hashes"

IMAGE_HASHES = ManifestSchema(
    name="image_hashes",
    version=1,
    fields=(
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("hash", pa.uint64(), nullable=False),  # 64-bit perceptual hash, bit 63 = first bit
    ),
)


@dataclass(frozen=True, kw_only=True, slots=True)
class PhashDedupConfig:
    algorithm: HashAlgorithm = "phash"
    max_distance: int = 2
    """Two images are near-duplicates when their hashes differ in at most this many bits. On the demo,
    2 finds most JPEG, resize and colour-shift copies; 4 adds mostly look-alike Fashion-MNIST products."""
    rows_per_shard: int = 1024
    """Rows hashed per shard: the unit of fan-out and resume of the image work."""
    rows_per_partition: int = DEFAULT_ROWS_PER_PARTITION
    """Rows per partition of the keep rule and the outputs (one output part each)."""
    keep: KeepRuleConfig = field(default_factory=KeepRuleConfig)

    def __post_init__(self) -> None:
        require(
            0 <= self.max_distance < HASH_BITS,
            f"max_distance must be in [0, {HASH_BITS}), got {self.max_distance}",
        )
        require(self.rows_per_shard >= 1, f"rows_per_shard must be >= 1, got {self.rows_per_shard}")
        require(
            self.rows_per_partition >= 1, f"rows_per_partition must be >= 1, got {self.rows_per_partition}"
        )


def _hash_row(algorithm: HashAlgorithm, row: dict) -> int:
    try:
        image = load_rgb(read_image_bytes(row))
    except OSError as err:
        raise OSError(f"cannot read {row['uri']} for its {algorithm}: {err}") from err
    return hash_image(algorithm, image)


def hash_shard(algorithm: HashAlgorithm, partition: Partition) -> ShardResult:
    """Shard worker: the perceptual hash of every row of a partition of `images`, in key order."""
    started = time.perf_counter()
    rows = partition.read(IMAGES.names, IMAGES)
    values = [_hash_row(algorithm, row) for row in rows.to_pylist()]
    table = pa.table(
        {
            "image_id": rows.column("image_id"),
            "uri": rows.column("uri"),
            "hash": pa.array(values, type=pa.uint64()),
        }
    )
    stats = {"hashing": {"rows": rows.num_rows, "seconds": round(time.perf_counter() - started, 3)}}
    return ShardResult(tables={HASHES_OUTPUT: table}, stats=stats)


def stored_hashes(images: KeyRanges, hashes_uri: str) -> np.ndarray:
    """uint64 hash of every images row, in key order, from a hashes manifest holding the same rows."""
    if images.num_rows == 0:  # a stage given no rows writes no hash parts to read
        return np.zeros(0, dtype=np.uint64)
    hashes = key_ranges(hashes_uri)
    images.check_aligned(hashes, "the hashes manifest")
    values = np.empty(images.num_rows, dtype=np.uint64)
    for path, start, stop in zip(
        hashes.offsets.parts, hashes.offsets.starts[:-1], hashes.offsets.starts[1:], strict=True
    ):
        column = pq.read_table(path, columns=["hash"], filesystem=hashes.offsets.fs).column("hash")
        values[start:stop] = np.asarray(column, dtype=np.uint64)
    return values


def nearest_kept(pairs: HashPairs, resolution: GroupResolution, dropped: np.ndarray) -> np.ndarray:
    """For each dropped row, the closest kept row it was paired with, else its group's representative.

    A component can chain rows that are far apart (a ~ b ~ c); naming a direct neighbour keeps the
    recorded match within the radius whenever such a kept neighbour exists. Ties go to the
    representative, then to the lower row index.
    """
    rows = np.concatenate([pairs.sources, pairs.targets])
    others = np.concatenate([pairs.targets, pairs.sources])
    distances = np.concatenate([pairs.distances, pairs.distances])
    usable = ~resolution.keep[rows] & resolution.keep[others]
    rows, others, distances = rows[usable], others[usable], distances[usable]
    not_representative = others != resolution.representative[rows]
    order = np.lexsort((others, not_representative, distances, rows))  # last key sorts first
    rows, others = rows[order], others[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = rows[1:] != rows[:-1]
    match = resolution.representative.copy()
    match[rows[first]] = others[first]
    match[resolution.keep] = NO_MATCH
    return match[dropped]


@dataclass(frozen=True, slots=True)
class HashGraph:
    """The search over known hashes and its components (labels per row, in the hashes' order)."""

    plan: SearchPlan
    pairs: HashPairs
    labels: np.ndarray
    search_seconds: float


def hash_graph(hashes: np.ndarray, max_distance: int) -> HashGraph:
    """Pairs within `max_distance` bits and their components."""
    started = time.perf_counter()
    plan = plan_search(len(hashes), max_distance)
    pairs = near_duplicate_pairs(hashes, max_distance, plan)
    labels = connected_components(len(hashes), pairs.sources, pairs.targets)
    return HashGraph(plan, pairs, labels, time.perf_counter() - started)


def dedup_stored_hashes(
    cfg: PhashDedupConfig, images: Manifest | KeyRanges, hashes: Manifest | str, ctx: StageContext
) -> dict[str, Any]:
    """The stage after hashing: the search, its components, the keep rule and the outputs, a partition at a
    time (`curation.dedup.keep`). The driver holds per-row numbers only: hashes, labels, the resolution.
    `hashes` holds the same rows as `images` (the hashing map's output)."""
    if isinstance(images, Manifest):
        images = stage_key_ranges(ctx, "images", images.uri, IMAGES, cfg.rows_per_partition)
    hashes = stored_hashes(images, hashes.uri if isinstance(hashes, Manifest) else hashes)
    graph = hash_graph(hashes, cfg.max_distance)
    resolution = resolve_partitioned(images, cfg.rows_per_partition, graph.labels, cfg.keep, ctx.executor)
    dropped = np.flatnonzero(~resolution.keep)
    match = nearest_kept(graph.pairs, resolution, dropped)
    similarity = (1.0 - hamming(hashes[dropped], hashes[match]) / HASH_BITS).astype(np.float32)
    del hashes
    decided = Dropped(resolution.keep, match, resolution.representative[dropped], similarity)
    write_partitioned(ctx, images, cfg.rows_per_partition, decided, REASON)
    if len(dropped):
        title = f"{cfg.algorithm} duplicates (Hamming distance <= {cfg.max_distance})"
        sheet = duplicate_groups_sheet(images.offsets, graph.labels, resolution, title)
        ctx.write_artifact(SHEET_NAME, sheet)
    return {
        "rows_in": images.num_rows,
        "rows_out": images.num_rows - len(dropped),
        "rejected": len(dropped),
        "pairs": len(graph.pairs),
        "index": graph.plan.describe(),
        "search_seconds": round(graph.search_seconds, 3),
        **component_stats(graph.labels),
    }


def run_phash_dedup(
    cfg: PhashDedupConfig, inputs: Mapping[str, Manifest], ctx: StageContext
) -> dict[str, Any]:
    images = stage_key_ranges(
        ctx, "images", inputs["images"].uri, IMAGES, cfg.rows_per_shard, cfg.rows_per_partition
    )
    worker = functools.partial(hash_shard, cfg.algorithm)
    shard_stats = ctx.map_shards(worker, images.shards(cfg.rows_per_shard), [HASHES_OUTPUT])
    return {**dedup_stored_hashes(cfg, images, ctx.output_uri(HASHES_OUTPUT), ctx), **shard_stats}


PHASH_DEDUP = register_stage(
    StageSpec(
        name="phash_dedup",
        # 2: the keep rule and the outputs run a partition at a time (one output part per partition)
        version=2,
        config_type=PhashDedupConfig,
        fn=run_phash_dedup,
        inputs={"images": IMAGES},
        outputs={"images": IMAGES, "rejected": DUPLICATES_REJECTED, HASHES_OUTPUT: IMAGE_HASHES},
        description="drop near-duplicates whose perceptual hashes lie within a Hamming radius",
        shown_stats=DEDUP_SHOWN_STATS,
    )
)
