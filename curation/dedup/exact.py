"""The `exact_dedup` stage: rows with the same bytes (same sha256 image_id) are one image.

images (any layout: ingest writes a part per file shard) --`pipelines.buckets`: image_id ranges of about
  `rows_per_part` rows, the input split into them part by part (a shuffle through the stage's folder)-->
  --ctx.map_shards over buckets: each worker groups its bucket by image_id and keeps one row per group
    (keep rule)--> one images part (kept rows in key order) and one rejected part (naming the kept row)
    per bucket: the first key-ranged manifest, which every later stage walks a partition at a time

The driver holds the bucket bounds (a sample of the ids) and one input part's pieces at a time; a group
never spans buckets, so each bucket's keep rule is the whole rule.
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.dedup.components import (
    DEDUP_SHOWN_STATS,
    DUPLICATES_REJECTED,
    SIZE_BUCKETS,
    KeepRuleConfig,
    duplicate_rejections,
    resolve_groups,
)
from curation.dedup.sheets import SHEET_GROUPS, duplicate_groups_sheet
from pipelines.buckets import Bucket, remove_buckets, spill_buckets
from pipelines.manifest import IMAGES, sort_rows
from pipelines.part_rows import TableRows
from pipelines.partitions import DEFAULT_ROWS_PER_PARTITION
from pipelines.stage import Manifest, ShardResult, StageContext, StageSpec, register_stage
from pipelines.validation import require

REASON = "exact_duplicate"
SHEET_NAME = "duplicate_groups.png"
SIZES_KEY = "group_sizes_exact"  # per bucket: group size -> groups (summed over buckets)
LARGEST_KEY = "largest_groups"  # per bucket: image_id -> size of its largest groups


@dataclass(frozen=True, kw_only=True, slots=True)
class ExactDedupConfig:
    keep: KeepRuleConfig = field(default_factory=KeepRuleConfig)
    rows_per_part: int = DEFAULT_ROWS_PER_PARTITION
    """Rows per bucket (about), so per part of the `images` output (content-keyed, key-ranged parts)."""

    def __post_init__(self) -> None:
        require(self.rows_per_part >= 1, f"rows_per_part must be >= 1, got {self.rows_per_part}")


def byte_groups(images: pa.Table) -> np.ndarray:
    """Label per row: the index of the first row with the same image_id (rows sharing bytes share it)."""
    encoded = pc.dictionary_encode(images.column("image_id")).combine_chunks()
    codes = np.asarray(encoded.indices, dtype=np.int64)
    first_row = np.full(len(encoded.dictionary), images.num_rows, dtype=np.int64)
    np.minimum.at(first_row, codes, np.arange(images.num_rows))
    return first_row[codes]


def dedup_bucket(rule: KeepRuleConfig, bucket: Bucket) -> ShardResult:
    """Worker: one image_id range's rows, one kept per byte group; its group sizes and largest groups."""
    images = sort_rows(bucket.read(IMAGES))
    labels = byte_groups(images)
    resolution = resolve_groups(images, labels, rule)
    dropped = np.flatnonzero(~resolution.keep)
    match, group = resolution.match[dropped], resolution.representative[dropped]
    ones = np.ones(len(dropped), dtype=np.float32)
    rejected = duplicate_rejections(images, dropped, match, group, ones, REASON)
    sizes = np.bincount(labels, minlength=len(labels))
    grouped = np.flatnonzero(sizes > 1)
    counts = np.unique(sizes[grouped], return_counts=True)
    largest = grouped[np.argsort(-sizes[grouped], kind="stable")[:SHEET_GROUPS]]
    ids = images.column("image_id")
    stats = {
        "rows_in": images.num_rows,
        "rejected": len(dropped),
        SIZES_KEY: {str(size): int(count) for size, count in zip(*counts, strict=True)},
        LARGEST_KEY: {ids[int(row)].as_py(): int(sizes[row]) for row in largest},
    }
    return ShardResult(tables={"images": images.filter(resolution.keep), "rejected": rejected}, stats=stats)


def group_stats(size_counts: Mapping[str, int]) -> dict[str, Any]:
    """component_stats' figures from summed per-bucket counts of group sizes."""
    counts = {int(size): count for size, count in size_counts.items()}
    histogram: dict[str, int] = {}
    for size, count in sorted(counts.items()):
        name = next((f"<={bound}" for bound in SIZE_BUCKETS if size <= bound), f">{SIZE_BUCKETS[-1]}")
        histogram[name] = histogram.get(name, 0) + count
    return {
        "groups": sum(counts.values()),
        "rows_in_groups": sum(size * count for size, count in counts.items()),
        "largest_group": max(counts, default=1),
        "group_sizes": histogram,
    }


def groups_sheet(buckets: list[Bucket], largest: Mapping[str, int], rule: KeepRuleConfig) -> bytes:
    """The largest groups overall (their rows read from their buckets), the kept image first."""
    chosen = heapq.nsmallest(SHEET_GROUPS, largest.items(), key=lambda item: (-item[1], item[0]))
    wanted = pa.array([image_id for image_id, _ in chosen], pa.string())
    rows = []
    for bucket in buckets:
        if any(_in_bucket(bucket, image_id) for image_id, _ in chosen):
            table = bucket.read(IMAGES)
            rows.append(table.filter(pc.is_in(table.column("image_id"), wanted)))
    members = sort_rows(pa.concat_tables(rows))
    labels = byte_groups(members)
    return duplicate_groups_sheet(
        TableRows(members), labels, resolve_groups(members, labels, rule), "exact duplicates"
    )


def _in_bucket(bucket: Bucket, image_id: str) -> bool:
    return (bucket.low is None or bucket.low <= image_id) and (bucket.high is None or image_id < bucket.high)


def run_exact_dedup(
    cfg: ExactDedupConfig, inputs: Mapping[str, Manifest], ctx: StageContext
) -> dict[str, Any]:
    shards = spill_buckets(ctx, inputs["images"].uri, cfg.rows_per_part)
    stats = ctx.map_shards(functools.partial(dedup_bucket, cfg.keep), shards)
    groups = group_stats(stats.get(SIZES_KEY, {}))
    largest = stats.get(LARGEST_KEY, {})
    if largest:
        ctx.write_artifact(SHEET_NAME, groups_sheet([shard.payload for shard in shards], largest, cfg.keep))
    remove_buckets(ctx)
    rows_in, rejected = stats.get("rows_in", 0), stats.get("rejected", 0)
    return {"rows_in": rows_in, "rows_out": rows_in - rejected, "rejected": rejected, **groups}


EXACT_DEDUP = register_stage(
    StageSpec(
        name="exact_dedup",
        # 2: a shuffle into image_id buckets: `images` and `rejected` in key-ranged parts, one per bucket
        version=2,
        config_type=ExactDedupConfig,
        fn=run_exact_dedup,
        inputs={"images": IMAGES},
        outputs={"images": IMAGES, "rejected": DUPLICATES_REJECTED},
        description="drop byte-identical copies, keeping one per group by the keep rule",
        shown_stats=DEDUP_SHOWN_STATS,
    )
)
