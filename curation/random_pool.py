"""The `random_pool` stage: the uncurated baseline of the paper's Table 2, as a curated-shaped manifest.

images (decontaminated; key ranges: the driver holds the uncurated rows' ids, 8 bytes a row, and reads
only the sampled rows) --uncurated rows, in (image_id, uri) order--> seeded uniform sample without
replacement, as many rows as the curated manifest has --> curated (IMAGES columns + provenance:
curation_mode "random", no query, similarity, rank or cluster); the same with seed + r for each further
replicate r of the ablation --> replicates (CURATED_REPLICATES: those rows + `replicate`)

Pretraining on this manifest and on assemble's `curated` with the same recipe isolates what curation
buys. The pool comes after dedup and decontamination, like the curated set, so only retrieval differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.manifest import CURATED, CURATED_REPLICATES, IMAGES, sort_rows
from pipelines.part_rows import RowReader, TableRows
from pipelines.partitions import KeyRanges, stage_key_ranges
from pipelines.stage import Manifest, StageContext, StageSpec, register_stage
from training.ablate import DataAblationConfig

POOL_ROLE = "uncurated"
RANDOM_MODE = "random"
# CURATED requires a seed source; a random row answers to no seed set, so it names the mode instead.
RANDOM_SEED_SOURCE = RANDOM_MODE


class PoolTooSmallError(ValueError):
    """The uncurated pool has fewer rows than the sample must hold."""


@dataclass(frozen=True, slots=True)
class UncuratedPool:
    """The uncurated rows of an images manifest in (image_id, uri) order, as row ids of `reader`.

    Why key order: a sample drawn from them then depends on the pool's content only, not on how
    upstream shards happened to lay it out. Only the sampled rows are ever read.
    """

    reader: RowReader
    rows: np.ndarray  # int64 row ids of the uncurated rows, in key order

    def __len__(self) -> int:
        return len(self.rows)


def uncurated_pool(images: pa.Table | KeyRanges) -> UncuratedPool:
    """The pool of a table in memory, or of a key-ranged manifest (8 bytes a row, no keys held)."""
    if isinstance(images, KeyRanges):
        return UncuratedPool(images.offsets, np.flatnonzero(images.column_is_in("role", [POOL_ROLE])))
    ordered = sort_rows(images)
    rows = np.flatnonzero(np.asarray(pc.equal(ordered.column("role"), POOL_ROLE).combine_chunks()))
    return UncuratedPool(TableRows(ordered), rows)


def random_pool_rows(pool: UncuratedPool, count: int, seed: int) -> pa.Table:
    """`count` rows of `pool`, drawn uniformly without replacement, as CURATED rows (in key order).

    Raises:
        PoolTooSmallError: fewer than `count` uncurated rows.
    """
    if len(pool) < count:
        raise PoolTooSmallError(
            f"random_pool: the uncurated pool has {len(pool)} rows, fewer than the {count} curated rows"
        )
    chosen = np.sort(np.random.default_rng(seed).choice(len(pool), size=count, replace=False))
    rows = IMAGES.validate(pool.reader.read_rows(pool.rows[chosen], IMAGES.names))
    provenance = {
        "seed_source": pa.array([RANDOM_SEED_SOURCE] * count, pa.string()),
        "curation_mode": pa.array([RANDOM_MODE] * count, pa.string()),
        "query_image_id": pa.nulls(count, pa.string()),
        "similarity": pa.nulls(count, pa.float32()),
        "rank": pa.nulls(count, pa.int32()),
        "cluster": pa.nulls(count, pa.int32()),
    }
    for name, column in provenance.items():
        rows = rows.append_column(name, column)
    return CURATED.validate(rows)


def replicate_rows(pool: UncuratedPool, count: int, cfg: DataAblationConfig) -> pa.Table:
    """The samples of replicates 1 .. replicates-1 (seeds cfg.seed + r), as CURATED_REPLICATES rows."""
    samples = []
    for replicate in range(1, cfg.replicates):
        rows = random_pool_rows(pool, count, cfg.seed + replicate)
        samples.append(rows.append_column("replicate", pa.array([replicate] * count, pa.int32())))
    return (
        CURATED_REPLICATES.validate(pa.concat_tables(samples))
        if samples
        else CURATED_REPLICATES.empty_table()
    )


def run_random_pool(
    cfg: DataAblationConfig, inputs: Mapping[str, Manifest], ctx: StageContext
) -> dict[str, Any]:
    pool = uncurated_pool(stage_key_ranges(ctx, "images", inputs["images"].uri, IMAGES))
    count = inputs["curated"].num_rows
    rows = random_pool_rows(pool, count, cfg.seed)
    ctx.write_output("curated", rows)
    ctx.write_output("replicates", replicate_rows(pool, count, cfg))
    return {
        "rows": rows.num_rows,
        "pool_rows": len(pool),
        "replicates": cfg.replicates,
    }


RANDOM_POOL = register_stage(
    StageSpec(
        name="random_pool",
        version=2,  # 2: the samples of the other replicates, in `replicates`
        config_type=DataAblationConfig,
        fn=run_random_pool,
        inputs={"images": IMAGES, "curated": CURATED},
        outputs={"curated": CURATED, "replicates": CURATED_REPLICATES},
        description="a seeded uniform sample of the uncurated pool, as many rows as the curated set",
        shown_stats={"pool_rows": "pool images", "rows": "sampled rows"},
    )
)
