"""The `exact_dedup` stage: rows with the same bytes (same sha256 image_id) are one image.

images --group by image_id--> keep one per group (keep rule) --> images, rejected (naming the kept row)

The one dedup stage that holds its input whole (a group-by over every row; at scale: a hash-partitioned
shuffle, not built). Its `images` leave in key order, in key-ranged parts of `rows_per_part` rows, so
every stage after it walks them a partition at a time (`pipelines.partitions`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc

from curation.dedup.components import (
    DEDUP_SHOWN_STATS,
    DUPLICATES_REJECTED,
    KeepRuleConfig,
    component_stats,
    duplicate_rejections,
    resolve_groups,
)
from curation.dedup.sheets import duplicate_groups_sheet
from pipelines.manifest import IMAGES
from pipelines.part_rows import TableRows
from pipelines.partitions import DEFAULT_ROWS_PER_PARTITION
from pipelines.shards import row_shards
from pipelines.stage import Manifest, StageContext, StageSpec, register_stage
from pipelines.validation import require

REASON = "exact_duplicate"
SHEET_NAME = "duplicate_groups.png"


@dataclass(frozen=True, kw_only=True, slots=True)
class ExactDedupConfig:
    keep: KeepRuleConfig = field(default_factory=KeepRuleConfig)
    rows_per_part: int = DEFAULT_ROWS_PER_PARTITION
    """Rows per part of the `images` output (content-keyed, key-ranged parts)."""

    def __post_init__(self) -> None:
        require(self.rows_per_part >= 1, f"rows_per_part must be >= 1, got {self.rows_per_part}")


def run_exact_dedup(
    cfg: ExactDedupConfig, inputs: Mapping[str, Manifest], ctx: StageContext
) -> dict[str, Any]:
    images = inputs["images"].read(IMAGES)
    # Label = index of the first row with the same image_id: rows sharing bytes share a label.
    encoded = pc.dictionary_encode(images.column("image_id")).combine_chunks()
    codes = np.asarray(encoded.indices, dtype=np.int64)
    first_row = np.full(len(encoded.dictionary), images.num_rows, dtype=np.int64)
    np.minimum.at(first_row, codes, np.arange(images.num_rows))
    labels = first_row[codes]
    resolution = resolve_groups(images, labels, cfg.keep)
    dropped = np.flatnonzero(~resolution.keep)
    rejected = duplicate_rejections(
        images,
        dropped,
        resolution.match[dropped],
        resolution.representative[dropped],
        np.ones(len(dropped), dtype=np.float32),
        REASON,
    )
    for shard in row_shards(images.filter(resolution.keep), cfg.rows_per_part):
        ctx.write_output("images", shard.payload, shard_id=shard.shard_id)
    ctx.write_output("rejected", rejected)
    if len(dropped):
        sheet = duplicate_groups_sheet(TableRows(images), labels, resolution, "exact duplicates")
        ctx.write_artifact(SHEET_NAME, sheet)
    return {
        "rows_in": images.num_rows,
        "rows_out": int(resolution.keep.sum()),
        "rejected": len(dropped),
        **component_stats(labels),
    }


EXACT_DEDUP = register_stage(
    StageSpec(
        name="exact_dedup",
        # 2: `images` in key-ranged parts, not one part in input order
        version=2,
        config_type=ExactDedupConfig,
        fn=run_exact_dedup,
        inputs={"images": IMAGES},
        outputs={"images": IMAGES, "rejected": DUPLICATES_REJECTED},
        description="drop byte-identical copies, keeping one per group by the keep rule",
        shown_stats=DEDUP_SHOWN_STATS,
    )
)
