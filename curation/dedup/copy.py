"""The `copy_dedup` stage: near-copies by copy-detection descriptors (the paper's SSCD self-dedup).

images (key ranges: `pipelines.partitions`) --per shard: the `copy_descriptor` model's embedder-->
  descriptors (every input row; resumable)
  --rows of `roles` only: `graph.graph_index` (Faiss, one index or shards)
  --`probe.probe_graph`: sampled rows' nearest neighbours; the threshold, calibrated on held-out
    synthetic copies for a target precision unless the config sets one--> calibration.png, near misses
  --k-NN graph (k neighbours, cosine > threshold, edges streamed into a union-find)--> components
  --keep rule, a partition at a time (`keep`)--> images (one per component, plus protected rows),
    rejected (naming the kept row), one part per partition

The k-NN index is one Faiss index here, or with `search.shards` > 1 split over the executor's workers
(`curation.search.sharded`): the same edges either way for a flat index. Descriptors are read where they
lie, a block at a time: the driver holds the index and per-row numbers (labels, the keep rule's result),
never the descriptor column, a key or a URI.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from curation.copydetect.calibrate import CalibrationConfig
from curation.copydetect.stage import COPY_DESCRIPTOR, descriptor_embedder
from curation.dedup.components import DEDUP_SHOWN_STATS, DUPLICATES_REJECTED, KeepRuleConfig, component_stats
from curation.dedup.descriptors import DESCRIPTORS, describe_shard
from curation.dedup.graph import (
    PAPER_GRAPH_NEIGHBOURS,
    check_graph_settings,
    located_descriptors,
    pair_cosines,
)
from curation.dedup.keep import Dropped, resolve_partitioned, write_partitioned
from curation.dedup.normalise import DEFAULT_BACKGROUND_ROWS
from curation.dedup.probe import THRESHOLD_SHOWN_STATS, probed_graph, record_probe
from curation.dedup.sheets import duplicate_groups_sheet
from curation.embedders import EmbedderConfig
from curation.search import SearchConfig
from pipelines.manifest import IMAGES, Role
from pipelines.partitions import DEFAULT_ROWS_PER_PARTITION, KeyRanges, stage_key_ranges
from pipelines.stage import Manifest, StageContext, StageSpec, register_stage
from pipelines.validation import require

REASON = "copy_duplicate"
SHEET_NAME = "duplicate_groups.png"
# The paper's copy-detection edges: cosine > 0.6 on SSCD descriptors (set it with an SSCD file).
PAPER_COPY_THRESHOLD = 0.6


@dataclass(frozen=True, kw_only=True, slots=True)
class CopyDedupConfig:
    roles: tuple[Role, ...] = ("uncurated",)
    """Rows of these roles form the duplicate graph (the paper dedups the uncurated pool); the others pass
    through, with descriptors for decontaminate. Add curated/eval to dedup across roles (keep rule)."""
    num_neighbours: int = PAPER_GRAPH_NEIGHBOURS
    threshold: float | None = None
    """Edges with cosine similarity above this join images into one duplicate component. Unset: chosen
    by `calibration` for the descriptor at hand (the paper's 0.6 is for SSCD's own weights)."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    score_normalization: bool = True
    """SSCD's score normalisation (`curation.dedup.normalise`): the threshold compares a pair's cosine
    minus its rows' background similarity. The paper's thresholds are raw cosines: set false with them."""
    background_rows: int = DEFAULT_BACKGROUND_ROWS
    search: SearchConfig = field(default_factory=SearchConfig)
    rows_per_shard: int = 256
    """Rows described per shard: the unit of fan-out and resume of the image work."""
    rows_per_partition: int = DEFAULT_ROWS_PER_PARTITION
    """Rows per partition of the keep rule and the outputs (one output part each)."""
    keep: KeepRuleConfig = field(default_factory=KeepRuleConfig)

    def __post_init__(self) -> None:
        check_graph_settings(self.num_neighbours, self.threshold)
        require(self.background_rows >= 1, f"background_rows must be >= 1, got {self.background_rows}")
        require(self.rows_per_shard >= 1, f"rows_per_shard must be >= 1, got {self.rows_per_shard}")
        require(
            self.rows_per_partition >= 1, f"rows_per_partition must be >= 1, got {self.rows_per_partition}"
        )
        require(bool(self.roles), "roles must name at least one role")


def dedup_stored_descriptors(
    cfg: CopyDedupConfig,
    images: Manifest | KeyRanges,
    descriptors: Manifest | str,
    embedder: EmbedderConfig | None,
    ctx: StageContext,
) -> dict[str, Any]:
    """The stage after describing: the probe, the graph, the keep rule and the outputs, a partition at a
    time. The driver holds the index and per-row numbers (labels, the resolution), never keys or URIs.
    `descriptors` holds the same rows as `images` (the describing map's output)."""
    if isinstance(images, Manifest):
        images = stage_key_ranges(ctx, "images", images.uri, IMAGES, cfg.rows_per_partition)
    uri = descriptors.uri if isinstance(descriptors, Manifest) else descriptors
    stored = located_descriptors(images, uri)
    # Rows outside `roles` get no edges: each stays a component of its own and is kept.
    in_scope = images.column_is_in("role", cfg.roles)
    compared = int(in_scope.sum())
    # Why None when every row is in scope (the usual pool): the graph then holds no row ids.
    scope = None if compared == images.num_rows else np.flatnonzero(in_scope)
    candidates = images.num_rows if scope is None else scope
    probe, graph = probed_graph(
        images.offsets, stored, scope, candidates, in_scope, cfg, embedder, ctx.executor
    )
    resolution = resolve_partitioned(images, cfg.rows_per_partition, graph.labels, cfg.keep, ctx.executor)
    dropped = np.flatnonzero(~resolution.keep)
    match = resolution.match[dropped]
    # The match is the component's kept row, which may be reached only through others: measure directly.
    similarity = pair_cosines(stored, dropped, match)
    decided = Dropped(resolution.keep, match, match, similarity)
    write_partitioned(ctx, images, cfg.rows_per_partition, decided, REASON)
    if len(dropped):
        title = f"copy-detection duplicates (score > {probe.threshold:.3f})"
        sheet = duplicate_groups_sheet(images.offsets, graph.labels, resolution, title)
        ctx.write_artifact(SHEET_NAME, sheet)
    return {
        **record_probe(probe, images.offsets, cfg.calibration, ctx),
        "rows_in": images.num_rows,
        "rows_out": images.num_rows - len(dropped),
        "rejected": len(dropped),
        "edges": graph.edges,
        "rows_compared": compared,
        "index": graph.index,
        "knn_seconds": round(graph.seconds, 3),
        **component_stats(graph.labels),
    }


def run_copy_dedup(cfg: CopyDedupConfig, inputs: Mapping[str, Manifest], ctx: StageContext) -> dict[str, Any]:
    images = stage_key_ranges(
        ctx, "images", inputs["images"].uri, IMAGES, cfg.rows_per_shard, cfg.rows_per_partition
    )
    # Why only with rows: an empty pool's copy_descriptor run holds no model, and none is needed.
    embedder = descriptor_embedder(inputs["model"]) if images.num_rows else None
    worker = functools.partial(describe_shard, embedder)
    shard_stats = ctx.map_shards(worker, images.shards(cfg.rows_per_shard), outputs=["descriptors"])
    described = shard_stats.get("descriptors", {})
    if described.get("seconds"):
        described["seconds"] = round(described["seconds"], 3)  # a sum of per-shard times
        described["images_per_second"] = round(described["rows"] / described["seconds"], 2)
    stats = dedup_stored_descriptors(cfg, images, ctx.output_uri("descriptors"), embedder, ctx)
    return {**stats, **shard_stats}


COPY_DEDUP = register_stage(
    StageSpec(
        name="copy_dedup",
        # 5: the keep rule and the outputs run a partition at a time (one output part per partition)
        version=5,
        config_type=CopyDedupConfig,
        fn=run_copy_dedup,
        inputs={"images": IMAGES, "model": COPY_DESCRIPTOR},
        outputs={"images": IMAGES, "rejected": DUPLICATES_REJECTED, "descriptors": DESCRIPTORS},
        description="drop near-copies found by copy-detection descriptors, k-NN and connected components",
        shown_stats={**DEDUP_SHOWN_STATS, **THRESHOLD_SHOWN_STATS},
    )
)
