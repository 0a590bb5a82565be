"""The `assemble` stage: seed images as is + retrieved pool images -> the curated manifest.

images (decontaminated; key ranges, never read whole) --curated sources, when include_seeds--> as_is
  rows, in key order
retrieved --their images rows found by a key merge (`partitions.key_positions`)--> sample | cluster rows
   --> curated (IMAGES columns + provenance) and composition (the paper's Table 15 per seed source)

A retrieved row whose pool image is not in `images` is an error, not a silent drop: retrieval must only
see the decontaminated pool, so such a row means the inputs come from different runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.hits import RETRIEVED
from curation.retrieve import COMPOSITION
from pipelines.manifest import CURATED, IMAGES, ManifestError
from pipelines.partitions import KeyRanges, key_positions, stage_key_ranges
from pipelines.stage import Manifest, StageContext, StageRun, StageSpec, register_stage
from pipelines.views import TableView, format_count, table_view

SEED_ROLE = "curated"
AS_IS = "as_is"
# Copied as they are from `retrieved`; its `mode` becomes `curation_mode` (IMAGES has a pixel `mode`).
COPIED_COLUMNS = ("query_image_id", "similarity", "rank", "cluster")


@dataclass(frozen=True, kw_only=True, slots=True)
class AssembleConfig:
    include_seeds: bool = True
    """Curated seed images go into the curated set as they are (the paper's "as is" rows)."""
    as_is_sources: tuple[str, ...] = ()
    """Curated sources kept as is; empty means every curated source (the paper keeps only some)."""


def seed_rows(images: KeyRanges, cfg: AssembleConfig) -> pa.Table:
    """Curated rows kept as they are, in key order: every curated source, or only `cfg.as_is_sources`
    (only those rows are read)."""
    wanted = images.column_is_in("role", [SEED_ROLE])
    if cfg.as_is_sources:
        wanted &= images.column_is_in("source", cfg.as_is_sources)
    seeds = IMAGES.validate(images.offsets.read_rows(np.flatnonzero(wanted), IMAGES.names))
    count = seeds.num_rows
    provenance = {
        "seed_source": seeds.column("source"),
        "curation_mode": pa.array([AS_IS] * count, pa.string()),
        "query_image_id": pa.nulls(count, pa.string()),
        "similarity": pa.nulls(count, pa.float32()),
        "rank": pa.nulls(count, pa.int32()),
        "cluster": pa.nulls(count, pa.int32()),
    }
    for name, column in provenance.items():
        seeds = seeds.append_column(name, column)
    return CURATED.validate(seeds)


def retrieved_rows(images: KeyRanges, retrieved: pa.Table) -> pa.Table:
    """Each retrieved row as its images row plus provenance, in `retrieved`'s order (the images rows
    found by a key merge, only they read)."""
    try:
        positions = key_positions(images, retrieved, "retrieved pool images")
    except ManifestError as err:
        raise ManifestError(f"retrieved pool images missing from the images manifest: {err}") from err
    rows = IMAGES.validate(images.offsets.read_rows(positions, IMAGES.names))
    rows = rows.append_column("seed_source", retrieved.column("seed_source"))
    rows = rows.append_column("curation_mode", retrieved.column("mode"))
    for name in COPIED_COLUMNS:
        rows = rows.append_column(name, retrieved.column(name))
    return CURATED.validate(rows)


def composition(seeds: pa.Table, retrieved: pa.Table, summary: pa.Table) -> pa.Table:
    """Per seed source and mode: seed images, retrieved (before the per-source cap) and final rows."""
    rows = []
    seed_sources = seeds.column("seed_source").to_numpy(zero_copy_only=False)
    for source in sorted(set(seed_sources.tolist())):
        count = int((seed_sources == source).sum())
        rows.append(
            {"seed_source": source, "mode": AS_IS, "seed_images": count, "retrieved": None, "final": count}
        )
    keys = zip(retrieved.column("seed_source").to_pylist(), retrieved.column("mode").to_pylist(), strict=True)
    final: dict[tuple[str, str], int] = {}
    for key in keys:
        final[key] = final.get(key, 0) + 1
    for entry in summary.sort_by("seed_source").to_pylist():
        key = (entry["seed_source"], entry["mode"])
        rows.append({**entry, "final": final.get(key, 0)})
    return COMPOSITION.table_from_rows(rows)


def composition_view(composition: pa.Table) -> TableView:
    """The paper's Table 15 layout: seed set, retrieval mode, seed images, retrieved, final; a total."""
    rows = composition.to_pylist()
    cells = [
        [
            row["seed_source"],
            row["mode"],
            *(format_count(row[name]) for name in ("seed_images", "retrieved", "final")),
        ]
        for row in rows
    ]
    total = ["total", "", "", "", format_count(sum(row["final"] for row in rows))]
    header = ["seed set", "retrieval", "images", "retrieved", "final"]
    return table_view("composition of the curated set", header, [*cells, total])


def composition_tables(run: StageRun) -> list[TableView]:
    return [composition_view(run.outputs["composition"].read(COMPOSITION))]


def run_assemble(cfg: AssembleConfig, inputs: Mapping[str, Manifest], ctx: StageContext) -> dict[str, Any]:
    images = stage_key_ranges(ctx, "images", inputs["images"].uri, IMAGES)
    retrieved = inputs["retrieved"].read(RETRIEVED)  # the curated set's size: what the output holds
    seeds = seed_rows(images, cfg) if cfg.include_seeds else CURATED.empty_table()
    pool_rows = retrieved_rows(images, retrieved)
    ctx.write_output("curated", seeds, shard_id=AS_IS)
    ctx.write_output("curated", pool_rows, shard_id="retrieved")
    table = composition(seeds, retrieved, inputs["retrieval_summary"].read(COMPOSITION))
    ctx.write_output("composition", table)

    def both(name: str) -> pa.ChunkedArray:
        return pa.chunked_array([*seeds.column(name).chunks, *pool_rows.column(name).chunks], pa.string())

    modes = pc.value_counts(both("curation_mode")).to_pylist()
    return {
        "rows": seeds.num_rows + pool_rows.num_rows,
        # Below rows when a pool image was retrieved several times (multiplicity) or is also a seed.
        "unique_images": pc.count_distinct(both("image_id")).as_py(),
        "rows_by_mode": {entry["values"]: entry["counts"] for entry in modes},
        "composition": table.to_pylist(),
    }


ASSEMBLE = register_stage(
    StageSpec(
        name="assemble",
        # 2: seed rows in key order (the images are walked as key ranges, not read whole)
        version=2,
        config_type=AssembleConfig,
        fn=run_assemble,
        inputs={"images": IMAGES, "retrieved": RETRIEVED, "retrieval_summary": COMPOSITION},
        outputs={"curated": CURATED, "composition": COMPOSITION},
        description="seed images as is plus retrieved images, with provenance and a composition table",
        shown_stats={"rows": "curated rows", "unique_images": "distinct images"},
        tables=composition_tables,
    )
)
