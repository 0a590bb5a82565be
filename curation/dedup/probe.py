"""Probing a duplicate graph's index before the graph is made: its threshold, and the pairs near it.

    [score normalisation] graph rows --`normalise.Background`--> each row's bias; a pair's score is its
      cosine minus the mean of its rows' biases (the graph and everything below use that score)
    sampled query rows --`GraphIndex.neighbours` (the query itself and rows not allowed left out)-->
      nearest non-copy pairs
    [threshold unset] query images --held-out copy edits, the stage's own descriptor--> copy scores
      --`choose_threshold` (target precision)--> the threshold, its estimated precision/recall curve
    --> near misses: the most similar pairs at or under the threshold, the least similar over it

Both dedup stages use it: `copy_dedup` probes pool rows against the pool, `decontaminate` eval rows
against the pool rows it may drop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from curation.copydetect.augment import held_out_copy
from curation.copydetect.calibrate import (
    THRESHOLD_BOUNDS,
    Calibration,
    CalibrationConfig,
    calibration_png,
    choose_threshold,
)
from curation.dedup.graph import DuplicateGraph, GraphIndex, graph_index
from curation.dedup.normalise import Background
from curation.embedders import EmbedderConfig, build_embedder
from curation.pictures import Tile, contact_sheet
from curation.search import SearchConfig
from curation.vector_parts import StoredVectors
from pipelines.executor import Executor
from pipelines.images import load_row_rgb, read_image_bytes
from pipelines.manifest import IMAGES
from pipelines.part_rows import RowReader
from pipelines.stage import StageContext

THRESHOLD_SHOWN_STATS = {
    "threshold": "cosine threshold",
    "estimated_precision": "estimated precision (calibration)",
    "estimated_recall": "estimated recall (calibration)",
}
NEAR_MISS_PAIRS = 12
NEAR_MISS_PAIRS_PER_ROW = 4
CALIBRATION_PICTURE = "calibration.png"
NEAR_MISSES_UNDER = "near_misses_under.png"
NEAR_MISSES_OVER = "near_misses_over.png"


@dataclass(frozen=True, slots=True)
class NeighbourPairs:
    """Distinct (first, second) images rows with their cosine: what the probe's k-NN saw."""

    first: np.ndarray
    second: np.ndarray
    similarity: np.ndarray


@dataclass(frozen=True, slots=True)
class Probe:
    threshold: float
    calibration: Calibration | None
    pairs: NeighbourPairs  # scored as the graph scores them (normalised when `bias` is set)
    bias: np.ndarray | None  # per index position: each row's background similarity


def sample_rows(rows: np.ndarray | int, count: int, seed: int) -> np.ndarray:
    """Up to `count` of `rows` (or of rows 0..rows-1: the same draw as from their array), drawn without
    replacement from `seed`, sorted."""
    rng = np.random.default_rng(seed)
    available = rows if isinstance(rows, int | np.integer) else len(rows)
    return np.sort(rng.choice(rows, size=min(count, available), replace=False))


def copy_descriptors(
    images: RowReader, queries: np.ndarray, embedder: EmbedderConfig, seed: int
) -> np.ndarray:
    """The descriptor of a held-out synthetic copy of each query row's image."""
    rng = np.random.default_rng(seed)
    rows = images.read_rows(queries, IMAGES.names).to_pylist()
    copies = [held_out_copy(load_row_rgb(row), rng) for row in rows]
    return build_embedder(embedder).embed_images(copies)


def probe_graph(
    index: GraphIndex,
    images: RowReader,
    candidates: np.ndarray | int,
    allowed: np.ndarray,
    num_neighbours: int,
    threshold: float | None,
    calibration: CalibrationConfig,
    embedder: EmbedderConfig | None,
    background_rows: int,
) -> Probe:
    """Samples queries among `candidates` (images rows in the graph; a count n: rows 0..n-1), finds their
    nearest `allowed` rows, and, when `threshold` is None, chooses it from synthetic copies of the queries.
    With `background_rows` > 0, every score is normalised against a background of that many graph rows."""
    bias = None
    if background_rows > 0:
        background = Background.sample(index.rows, background_rows, calibration.seed)
        bias = background.row_bias(index.rows)
    queries = sample_rows(candidates, calibration.sample_rows, calibration.seed)
    if len(queries) == 0:  # no row to compare (an empty pool, no eval rows): no edge can matter
        empty = np.zeros(0, dtype=np.int64)
        nothing = NeighbourPairs(empty, empty, np.zeros(0, dtype=np.float32))
        return Probe(THRESHOLD_BOUNDS[1] if threshold is None else threshold, None, nothing, bias)
    neighbours, cosines = index.neighbours(queries, num_neighbours, allowed)
    found = neighbours >= 0
    query_rows = np.repeat(queries, found.sum(axis=1))
    scores = cosines[found]
    if bias is not None:
        scores = scores - (bias[index.positions(query_rows)] + bias[index.positions(neighbours[found])]) / 2
    pairs = distinct_pairs(query_rows, neighbours[found], scores)
    if threshold is not None:
        return Probe(threshold, None, pairs, bias)
    assert embedder is not None, "rows to calibrate on come with the model that described them"
    positions = index.positions(queries)
    originals = index.rows.read_rows(positions)
    copies = copy_descriptors(images, queries, embedder, calibration.seed)
    positives = np.einsum("ij,ij->i", copies, originals)
    if bias is not None:  # a copy's background leaves out its own original
        positives = positives - (bias[positions] + background.bias(copies, positions)) / 2
    chosen = choose_threshold(positives, scores, calibration.target_precision, calibration.copy_rate)
    return Probe(chosen.threshold, chosen, pairs, bias)


class ProbedGraphSettings(Protocol):
    """The settings copy_dedup and decontaminate share for their graph and its threshold."""

    num_neighbours: int
    threshold: float | None
    calibration: CalibrationConfig
    search: SearchConfig
    score_normalization: bool
    background_rows: int


def probed_graph(
    images: RowReader,
    descriptors: StoredVectors,
    graph_rows: np.ndarray | None,
    candidates: np.ndarray | int,
    allowed: np.ndarray,
    cfg: ProbedGraphSettings,
    embedder: EmbedderConfig | None,
    executor: Executor,
) -> tuple[Probe, DuplicateGraph]:
    """The graph over `graph_rows` (None: every row), its index probed first (`probe_graph`) for the
    threshold it uses."""
    with graph_index(descriptors, graph_rows, cfg.search, executor) as index:
        background = cfg.background_rows if cfg.score_normalization else 0
        probe = probe_graph(
            index,
            images,
            candidates,
            allowed,
            cfg.num_neighbours,
            cfg.threshold,
            cfg.calibration,
            embedder,
            background,
        )
        return probe, index.components(cfg.num_neighbours, probe.threshold, probe.bias)


def distinct_pairs(first: np.ndarray, second: np.ndarray, similarity: np.ndarray) -> NeighbourPairs:
    """Each undirected pair once (two sampled rows may find each other)."""
    low, high = np.minimum(first, second), np.maximum(first, second)
    _, keep = np.unique(np.stack([low, high], axis=1), axis=0, return_index=True)
    return NeighbourPairs(low[keep], high[keep], similarity[keep])


def record_probe(probe: Probe, images: RowReader, calibration: CalibrationConfig, ctx: StageContext) -> dict:
    """Writes the calibration picture and the near-miss sheets; returns the stats to record."""
    stats: dict = {
        "threshold": round(probe.threshold, 4),
        "threshold_source": "config",
        "score_normalization": probe.bias is not None,
    }
    if probe.calibration is not None:
        stats["threshold_source"] = "calibrated"
        stats["calibration"] = probe.calibration.record(calibration.target_precision)
        stats["estimated_precision"] = stats["calibration"]["estimated_precision"]
        stats["estimated_recall"] = stats["calibration"]["estimated_recall"]
        if not probe.calibration.reached_target:
            ctx.warn(
                f"no threshold reaches the target precision {calibration.target_precision}; using "
                f"{probe.threshold:.4f}, the most precise (estimated {probe.calibration.precision:.3f})"
            )
        title = f"{ctx.spec.name}: copies vs nearest non-copies"
        ctx.write_artifact(
            CALIBRATION_PICTURE, calibration_png(probe.calibration, calibration.target_precision, title)
        )
    pairs = probe.pairs
    over = np.flatnonzero(pairs.similarity > probe.threshold)
    under = np.flatnonzero(pairs.similarity <= probe.threshold)
    closest_over = over[np.argsort(pairs.similarity[over], kind="stable")][:NEAR_MISS_PAIRS]
    closest_under = under[np.argsort(-pairs.similarity[under], kind="stable")][:NEAR_MISS_PAIRS]
    for name, chosen, side in (
        (NEAR_MISSES_OVER, closest_over, "least similar pairs over"),
        (NEAR_MISSES_UNDER, closest_under, "most similar pairs at or under"),
    ):
        if len(chosen):
            title = f"{ctx.spec.name}: {side} the threshold {probe.threshold:.3f} (sampled rows' neighbours)"
            ctx.write_artifact(name, pair_sheet(images, pairs, chosen, title))
    return stats


def image_tile(images: RowReader, row: int, caption: str, highlight: bool = False) -> Tile:
    """A tile of images row `row`; an empty frame if its bytes cannot be read any more."""
    try:
        data = read_image_bytes(images.read_rows(np.asarray([row]), IMAGES.names).to_pylist()[0])
    except OSError:
        data = None
    return Tile(data, caption, highlight)


def pair_sheet(images: RowReader, pairs: NeighbourPairs, chosen: np.ndarray, title: str) -> bytes:
    """Each chosen pair side by side, its cosine under both images."""
    tiles = []
    for position in chosen:
        caption = f"{pairs.similarity[position]:.3f}"
        tiles.append(image_tile(images, int(pairs.first[position]), caption))
        tiles.append(image_tile(images, int(pairs.second[position]), caption))
    width = 2 * NEAR_MISS_PAIRS_PER_ROW
    return contact_sheet([tiles[start : start + width] for start in range(0, len(tiles), width)], title)
