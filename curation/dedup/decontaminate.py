"""The `decontaminate` stage: pool images too close to an evaluation image go, whole component and all.

images + descriptors (copy_dedup's, restricted to these images, read where they lie) + the descriptor model
  --`graph.graph_index` (Faiss, one index or `search.shards` shards on the executor's workers)
  --`probe.probe_graph`: sampled eval rows' nearest pool rows; the threshold, calibrated on held-out
    synthetic copies of eval images unless the config sets one--> calibration.png, near misses
  --k-NN graph (cosine > threshold, edges streamed into a union-find)--> components
  --components holding an eval image--> their drop_roles rows are rejected, each naming the eval image
                                        of its component most similar to it
  --> images (the rest), rejected (reason eval_contamination), one part per partition of the key-ranged
      input (`pipelines.partitions`); decontaminated.png
The driver holds the index, per-row numbers and the descriptors of the rows it rejects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from curation.copydetect.calibrate import CalibrationConfig
from curation.copydetect.stage import COPY_DESCRIPTOR, descriptor_embedder
from curation.dedup.components import DEDUP_SHOWN_STATS, DUPLICATES_REJECTED, component_stats
from curation.dedup.descriptors import DESCRIPTORS
from curation.dedup.graph import (
    PAPER_GRAPH_NEIGHBOURS,
    HeldRows,
    check_graph_settings,
    held_rows,
    located_descriptors,
)
from curation.dedup.keep import Dropped, write_partitioned
from curation.dedup.normalise import DEFAULT_BACKGROUND_ROWS
from curation.dedup.probe import THRESHOLD_SHOWN_STATS, image_tile, probed_graph, record_probe
from curation.pictures import contact_sheet
from curation.search import SearchConfig
from pipelines.manifest import IMAGES, Role
from pipelines.part_rows import RowReader
from pipelines.partitions import DEFAULT_ROWS_PER_PARTITION, stage_key_ranges
from pipelines.stage import Manifest, StageContext, StageSpec, register_stage
from pipelines.validation import require

REASON = "eval_contamination"
EVAL_ROLE = "eval"
SHEET_NAME = "decontaminated.png"
SHEET_PAIRS = 32
SHEET_PAIRS_PER_ROW = 4
# Rows of a contaminated component compared with its eval images at once: bounds a [rows, evals] block.
MATCH_BLOCK_ROWS = 4096
# The paper removes pool images with cosine > 0.45 to an evaluation image (on SSCD descriptors; set it
# with an SSCD file).
PAPER_DECONTAMINATION_THRESHOLD = 0.45


@dataclass(frozen=True, kw_only=True, slots=True)
class DecontaminateConfig:
    num_neighbours: int = PAPER_GRAPH_NEIGHBOURS
    threshold: float | None = None
    """Pool images in a component (cosine > threshold) with an eval image are removed. Unset: chosen by
    `calibration` on synthetic copies of eval images against their nearest pool images."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    score_normalization: bool = True
    """SSCD's score normalisation (`curation.dedup.normalise`): the threshold compares a pair's cosine
    minus its rows' background similarity. The paper's thresholds are raw cosines: set false with them."""
    background_rows: int = DEFAULT_BACKGROUND_ROWS
    drop_roles: tuple[Role, ...] = ("uncurated",)
    search: SearchConfig = field(default_factory=SearchConfig)
    rows_per_partition: int = DEFAULT_ROWS_PER_PARTITION
    """Rows per partition of the outputs (one output part each)."""

    def __post_init__(self) -> None:
        check_graph_settings(self.num_neighbours, self.threshold)
        require(
            self.rows_per_partition >= 1, f"rows_per_partition must be >= 1, got {self.rows_per_partition}"
        )
        require(self.background_rows >= 1, f"background_rows must be >= 1, got {self.background_rows}")
        require(
            EVAL_ROLE not in self.drop_roles,
            "drop_roles must not contain eval: eval images are the references",
        )


def best_eval_matches(
    vectors: HeldRows, labels: np.ndarray, dropped: np.ndarray, eval_rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each dropped row, the eval row of its component with the highest cosine, and that cosine."""
    match = np.empty(len(dropped), dtype=np.int64)
    similarity = np.empty(len(dropped), dtype=np.float32)
    evals_of = _rows_by_label(labels, eval_rows)
    for label, positions in _rows_by_label(labels[dropped], np.arange(len(dropped))).items():
        candidates = evals_of[label]
        for start in range(0, len(positions), MATCH_BLOCK_ROWS):
            block = positions[start : start + MATCH_BLOCK_ROWS]
            scores = vectors[dropped[block]] @ vectors[candidates].T
            best = scores.argmax(axis=1)
            match[block] = candidates[best]
            similarity[block] = scores[np.arange(len(block)), best]
    return match, similarity


def _rows_by_label(labels: np.ndarray, rows: np.ndarray) -> dict[int, np.ndarray]:
    """`rows` grouped by `labels[rows]` with one sort (no pass over all rows per label)."""
    if len(rows) == 0:
        return {}
    order = rows[np.argsort(labels[rows], kind="stable")]
    values, starts = np.unique(labels[order], return_index=True)
    return dict(zip(values.tolist(), np.split(order, starts[1:]), strict=True))


def run_decontaminate(
    cfg: DecontaminateConfig, inputs: Mapping[str, Manifest], ctx: StageContext
) -> dict[str, Any]:
    images = stage_key_ranges(ctx, "images", inputs["images"].uri, IMAGES, cfg.rows_per_partition)
    descriptors = located_descriptors(images, inputs["descriptors"].uri)
    eval_rows = np.flatnonzero(images.column_is_in("role", [EVAL_ROLE]))
    droppable = images.column_is_in("role", cfg.drop_roles)
    # Why only with rows: an empty pool's copy_descriptor run holds no model, and none is needed.
    embedder = descriptor_embedder(inputs["model"]) if images.num_rows else None
    probe, graph = probed_graph(
        images.offsets, descriptors, None, eval_rows, droppable, cfg, embedder, ctx.executor
    )
    labels = graph.labels

    contaminated = np.isin(labels, labels[eval_rows])
    dropped = np.flatnonzero(contaminated & droppable)
    # Only the rejected rows and the eval rows are ever compared again: read just those.
    vectors = held_rows(descriptors, np.concatenate([dropped, eval_rows]))
    match, similarity = best_eval_matches(vectors, labels, dropped, eval_rows)
    keep = np.ones(images.num_rows, dtype=bool)
    keep[dropped] = False
    # group_id names the eval image: the component's reason for going.
    write_partitioned(ctx, images, cfg.rows_per_partition, Dropped(keep, match, match, similarity), REASON)
    if len(dropped):
        sheet = contamination_sheet(images.offsets, dropped, match, similarity, probe.threshold)
        ctx.write_artifact(SHEET_NAME, sheet)
    return {
        **record_probe(probe, images.offsets, cfg.calibration, ctx),
        "rows_in": images.num_rows,
        "rows_out": int(keep.sum()),
        "rejected": len(dropped),
        "eval_rows": len(eval_rows),
        "eval_images_matched": len(np.unique(match)),
        "contaminated_components": len(np.unique(labels[dropped])),
        "edges": graph.edges,
        "index": graph.index,
        "knn_seconds": round(graph.seconds, 3),
        **component_stats(labels),
    }


def contamination_sheet(
    images: RowReader, dropped: np.ndarray, match: np.ndarray, similarity: np.ndarray, threshold: float
) -> bytes:
    """Removed pool images beside their eval match (red frame), spread over the similarity range."""
    order = np.argsort(-similarity, kind="stable")
    # Why: evenly spaced picks show the borderline pairs near the threshold, not only the obvious ones.
    picks = order[np.unique(np.linspace(0, len(order) - 1, min(SHEET_PAIRS, len(order))).round().astype(int))]
    tiles = []
    for position in picks:
        tiles.append(image_tile(images, int(dropped[position]), f"pool {similarity[position]:.2f}"))
        tiles.append(image_tile(images, int(match[position]), "eval", highlight=True))
    width = 2 * SHEET_PAIRS_PER_ROW
    rows = [tiles[start : start + width] for start in range(0, len(tiles), width)]
    title = f"decontaminated: pool image, then its eval match (score > {threshold:.3f}), most similar first"
    return contact_sheet(rows, title)


DECONTAMINATE = register_stage(
    StageSpec(
        name="decontaminate",
        # 5: the outputs are written a partition at a time (one output part per partition)
        version=5,
        config_type=DecontaminateConfig,
        fn=run_decontaminate,
        inputs={"images": IMAGES, "descriptors": DESCRIPTORS, "model": COPY_DESCRIPTOR},
        outputs={"images": IMAGES, "rejected": DUPLICATES_REJECTED},
        description="drop pool images whose duplicate component holds an evaluation image",
        shown_stats={
            **DEDUP_SHOWN_STATS,
            **THRESHOLD_SHOWN_STATS,
            "eval_images_matched": "eval images matched",
            "contaminated_components": "contaminated components",
        },
    )
)
