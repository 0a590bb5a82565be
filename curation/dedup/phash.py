"""The `phash_dedup` stage: near-duplicates by 64-bit perceptual hash within a Hamming radius.

images --per shard: decode, imagededup hash--> hashes (every input row; resumable)
  --Faiss binary range search (radius max_distance)--> pairs --union-find--> components
  --keep rule--> images (one per component, plus protected rows), rejected (naming a kept row)
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from curation.dedup.components import (
    DEDUP_SHOWN_STATS,
    DUPLICATES_REJECTED,
    NO_MATCH,
    GroupResolution,
    KeepRuleConfig,
    component_stats,
    connected_components,
    duplicate_rejections,
    resolve_groups,
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
from curation.dedup.sheets import duplicate_groups_sheet
from pipelines.images import load_rgb, read_image_bytes
from pipelines.manifest import IMAGES, ManifestSchema, align_rows
from pipelines.shards import row_shards
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
    keep: KeepRuleConfig = field(default_factory=KeepRuleConfig)

    def __post_init__(self) -> None:
        require(
            0 <= self.max_distance < HASH_BITS,
            f"max_distance must be in [0, {HASH_BITS}), got {self.max_distance}",
        )
        require(self.rows_per_shard >= 1, f"rows_per_shard must be >= 1, got {self.rows_per_shard}")


def _hash_row(algorithm: HashAlgorithm, row: dict) -> int:
    try:
        image = load_rgb(read_image_bytes(row))
    except OSError as err:
        raise OSError(f"cannot read {row['uri']} for its {algorithm}: {err}") from err
    return hash_image(algorithm, image)


def hash_shard(algorithm: HashAlgorithm, rows: pa.Table) -> ShardResult:
    """Shard worker: the perceptual hash of every row of an `images` slice."""
    started = time.perf_counter()
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


def aligned_hashes(images: pa.Table, hashes: pa.Table) -> np.ndarray:
    """uint64 hashes of `images`' rows, in `images`' order, matched on (image_id, uri)."""
    return np.asarray(hashes.column("hash"), dtype=np.uint64)[align_rows(images, hashes)]


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
class HashDedup:
    """The outcome of dedup over known hashes: the search, its components and what the keep rule drops."""

    plan: SearchPlan
    pairs: HashPairs
    labels: np.ndarray
    resolution: GroupResolution
    rejected: pa.Table
    search_seconds: float


def dedup_by_hash(images: pa.Table, hashes: np.ndarray, max_distance: int, keep: KeepRuleConfig) -> HashDedup:
    """Pairs within `max_distance` bits, their components, and one kept row per component by `keep`."""
    started = time.perf_counter()
    plan = plan_search(len(hashes), max_distance)
    pairs = near_duplicate_pairs(hashes, max_distance, plan)
    labels = connected_components(images.num_rows, pairs.sources, pairs.targets)
    search_seconds = time.perf_counter() - started

    resolution = resolve_groups(images, labels, keep)
    dropped = np.flatnonzero(~resolution.keep)
    match = nearest_kept(pairs, resolution, dropped)
    similarity = (1.0 - hamming(hashes[dropped], hashes[match]) / HASH_BITS).astype(np.float32)
    rejected = duplicate_rejections(
        images, dropped, match, resolution.representative[dropped], similarity, REASON
    )
    return HashDedup(plan, pairs, labels, resolution, rejected, search_seconds)


def run_phash_dedup(
    cfg: PhashDedupConfig, inputs: Mapping[str, Manifest], ctx: StageContext
) -> dict[str, Any]:
    images = inputs["images"].read(IMAGES)
    shards = row_shards(images, cfg.rows_per_shard)
    shard_stats = ctx.map_shards(functools.partial(hash_shard, cfg.algorithm), shards, [HASHES_OUTPUT])
    hashes = aligned_hashes(images, ctx.read_output(HASHES_OUTPUT))
    result = dedup_by_hash(images, hashes, cfg.max_distance, cfg.keep)

    ctx.write_output("images", images.filter(result.resolution.keep))
    ctx.write_output("rejected", result.rejected)
    if result.rejected.num_rows:
        title = f"{cfg.algorithm} duplicates (Hamming distance <= {cfg.max_distance})"
        sheet = duplicate_groups_sheet(images, result.labels, result.resolution, title)
        ctx.write_artifact(SHEET_NAME, sheet)
    return {
        "rows_in": images.num_rows,
        "rows_out": int(result.resolution.keep.sum()),
        "rejected": result.rejected.num_rows,
        "pairs": len(result.pairs),
        "index": result.plan.describe(),
        "search_seconds": round(result.search_seconds, 3),
        **shard_stats,
        **component_stats(result.labels),
    }


PHASH_DEDUP = register_stage(
    StageSpec(
        name="phash_dedup",
        version=1,
        config_type=PhashDedupConfig,
        fn=run_phash_dedup,
        inputs={"images": IMAGES},
        outputs={"images": IMAGES, "rejected": DUPLICATES_REJECTED, HASHES_OUTPUT: IMAGE_HASHES},
        description="drop near-duplicates whose perceptual hashes lie within a Hamming radius",
        shown_stats=DEDUP_SHOWN_STATS,
    )
)
