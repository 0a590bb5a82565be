"""The `random_pool` stage: the uncurated baseline of the paper's Table 2, as a curated-shaped manifest.

images (decontaminated) --uncurated rows, in (image_id, uri) order--> seeded uniform sample without
replacement, as many rows as the curated manifest has --> curated (IMAGES columns + provenance:
curation_mode "random", no query, similarity, rank or cluster); the same with seed + r for each further
replicate r of the ablation --> replicates (CURATED_REPLICATES: those rows + `replicate`)

Pretraining on this manifest and on assemble's `curated` with the same recipe isolates what curation
buys. The pool comes after dedup and decontamination, like the curated set, so only retrieval differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.manifest import CURATED, CURATED_REPLICATES, IMAGES, sort_rows
from pipelines.stage import Manifest, StageContext, StageSpec, register_stage
from training.ablate import DataAblationConfig

POOL_ROLE = "uncurated"
RANDOM_MODE = "random"
# CURATED requires a seed source; a random row answers to no seed set, so it names the mode instead.
RANDOM_SEED_SOURCE = RANDOM_MODE


class PoolTooSmallError(ValueError):
    """The uncurated pool has fewer rows than the sample must hold."""


def uncurated_pool(images: pa.Table) -> pa.Table:
    """The uncurated rows of `images` in (image_id, uri) order.

    Why sorted: a sample drawn from them then depends on the pool's content only, not on how upstream
    shards happened to order it.
    """
    return sort_rows(images.filter(pc.equal(images.column("role"), POOL_ROLE)))


def random_pool_rows(images: pa.Table, count: int, seed: int) -> pa.Table:
    """`count` uncurated rows of `images`, drawn uniformly without replacement, as CURATED rows.

    Raises:
        PoolTooSmallError: fewer than `count` uncurated rows.
    """
    pool = uncurated_pool(images)
    if pool.num_rows < count:
        raise PoolTooSmallError(
            f"random_pool: the uncurated pool has {pool.num_rows} rows, fewer than the {count} curated rows"
        )
    chosen = np.sort(np.random.default_rng(seed).choice(pool.num_rows, size=count, replace=False))
    rows = pool.take(pa.array(chosen, pa.int64()))
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


def replicate_rows(images: pa.Table, count: int, cfg: DataAblationConfig) -> pa.Table:
    """The samples of replicates 1 .. replicates-1 (seeds cfg.seed + r), as CURATED_REPLICATES rows."""
    samples = []
    for replicate in range(1, cfg.replicates):
        rows = random_pool_rows(images, count, cfg.seed + replicate)
        samples.append(rows.append_column("replicate", pa.array([replicate] * count, pa.int32())))
    return (
        CURATED_REPLICATES.validate(pa.concat_tables(samples))
        if samples
        else CURATED_REPLICATES.empty_table()
    )


def run_random_pool(
    cfg: DataAblationConfig, inputs: Mapping[str, Manifest], ctx: StageContext
) -> dict[str, Any]:
    images = inputs["images"].read(IMAGES)
    count = inputs["curated"].num_rows
    rows = random_pool_rows(images, count, cfg.seed)
    ctx.write_output("curated", rows)
    ctx.write_output("replicates", replicate_rows(images, count, cfg))
    return {
        "rows": rows.num_rows,
        "pool_rows": uncurated_pool(images).num_rows,
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
