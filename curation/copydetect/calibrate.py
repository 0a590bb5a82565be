"""A copy threshold chosen for a target precision, from copies the descriptor never saw.

    sampled rows --`held_out_copy`--> synthetic copies --descriptor--> copy similarities (positives)
    sampled rows --k-NN in the stage's own index, the row itself left out--> nearest non-copy
      similarities (negatives: the pairs a k-NN graph would weigh beside each copy)
    --`choose_threshold`--> the lowest cosine t at which the estimated precision reaches the target

At a threshold t, a row with a copy finds it with probability recall(t) (the synthetic copies' share
above t), and any row makes false edges to the non-copies among its neighbours above t (the sampled
rows' mean count). With a prior share `copy_rate` of rows that have a copy:

    precision(t) = copy_rate * recall(t) / (copy_rate * recall(t) + false edges per row(t))

A pool row that really has a copy makes that copy count as a non-copy, so on a pool full of copies the
estimate is pessimistic (the threshold errs high).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.validation import require
from pipelines.views import figure_png, pyplot

# The curve recorded for users: precision and recall at these cosines.
CURVE_STEP = 0.02
# A threshold must lie strictly inside (0, 1) (`graph.check_graph_settings`).
THRESHOLD_BOUNDS = (0.01, 0.99)
CANDIDATE_EPSILON = 1e-6
MIN_COPIES_ABOVE = 10
# The paper's self-dedup took 1.3B images to 1.1B: about 15% of a web pool's rows had a copy.
PAPER_COPY_RATE = 0.15
FIGURE_SIZE = (10, 3.4)
DPI = 100
HISTOGRAM_BINS = 50


@dataclass(frozen=True, kw_only=True, slots=True)
class CalibrationConfig:
    """How the threshold is chosen when none is set: a precision target on synthetic copies."""

    target_precision: float = 0.95
    copy_rate: float = PAPER_COPY_RATE
    """The share of rows that have a copy, a prior: precision is estimated at this prevalence."""
    sample_rows: int = 512
    """Rows copied (with held-out edits) and searched for their nearest non-copies."""
    seed: int = 0

    def __post_init__(self) -> None:
        require(
            0 < self.target_precision < 1, f"target_precision must be in (0, 1), got {self.target_precision}"
        )
        require(0 < self.copy_rate <= 1, f"copy_rate must be in (0, 1], got {self.copy_rate}")
        require(self.sample_rows >= 1, f"sample_rows must be >= 1, got {self.sample_rows}")


@dataclass(frozen=True, slots=True)
class Calibration:
    threshold: float
    precision: float  # estimated, of the edges above the threshold
    recall: float  # share of synthetic copies above the threshold
    reached_target: bool
    positives: np.ndarray  # cosine of each synthetic copy with its original
    negatives: np.ndarray  # cosine of each sampled row with each of its nearest non-copies
    copy_rate: float

    def curve(self, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return precision_recall(self.positives, self.negatives, thresholds, self.copy_rate)

    def record(self, target_precision: float) -> dict[str, Any]:
        """What `_STAGE.json` keeps: the choice and the estimated precision/recall curve."""
        grid = np.round(np.arange(0.0, 1.0 + CURVE_STEP / 2, CURVE_STEP), 4)
        precision, recall = self.curve(grid)
        return {
            "target_precision": target_precision,
            "copy_rate": self.copy_rate,
            "threshold": round(self.threshold, 4),
            "estimated_precision": round(self.precision, 4),
            "estimated_recall": round(self.recall, 4),
            "reached_target": self.reached_target,
            "copies": len(self.positives),
            "non_copy_pairs": len(self.negatives),
            "curve": {
                "threshold": grid.tolist(),
                "precision": np.round(precision, 4).tolist(),
                "recall": np.round(recall, 4).tolist(),
            },
        }


def precision_recall(
    positives: np.ndarray, negatives: np.ndarray, thresholds: np.ndarray, copy_rate: float
) -> tuple[np.ndarray, np.ndarray]:
    """Estimated precision and recall of the edges with cosine > each threshold (module docstring);
    precision 1 where no pair is above. One sampled row per positive: false edges per row are the
    negatives above over the positives' count."""
    queries = max(1, len(positives))
    recall = (len(positives) - np.searchsorted(np.sort(positives), thresholds, side="right")) / queries
    false_per_row = (len(negatives) - np.searchsorted(np.sort(negatives), thresholds, side="right")) / queries
    true_per_row = copy_rate * recall
    found = true_per_row + false_per_row
    precision = np.where(found > 0, true_per_row / np.where(found > 0, found, 1.0), 1.0)
    return precision, recall


def choose_threshold(
    positives: np.ndarray, negatives: np.ndarray, target_precision: float, copy_rate: float
) -> Calibration:
    """The lowest cosine t (the most copies found) whose estimated precision reaches the target, among
    those with at least MIN_COPIES_ABOVE copies above; if no t does, the t of the highest precision
    (`reached_target` False)."""
    positives = np.asarray(positives, dtype=np.float64)
    negatives = np.asarray(negatives, dtype=np.float64)
    require(len(positives) > 0, "calibration needs at least one synthetic copy")
    # Precision and recall change only at observed cosines: those, and just below the lowest copy.
    candidates = np.unique(np.concatenate([positives, negatives, [positives.min() - CANDIDATE_EPSILON]]))
    candidates = candidates[(candidates >= THRESHOLD_BOUNDS[0]) & (candidates <= THRESHOLD_BOUNDS[1])]
    if len(candidates) == 0:
        candidates = np.array(THRESHOLD_BOUNDS)
    precision, recall = precision_recall(positives, negatives, candidates, copy_rate)
    # Why a floor on the copies above: a precision measured on a handful of copies is noise (one copy
    # and no neighbour above a threshold reads 100%).
    support = np.round(recall * len(positives))
    useful = support >= min(MIN_COPIES_ABOVE, len(positives))
    reached = useful & (precision >= target_precision)
    if reached.any():
        position = int(np.flatnonzero(reached)[0])
    else:
        scores = np.where(useful, precision, -1.0)
        position = int(np.flatnonzero(scores == scores.max())[0])
    return Calibration(
        threshold=float(candidates[position]),
        precision=float(precision[position]),
        recall=float(recall[position]),
        reached_target=bool(reached.any()),
        positives=positives,
        negatives=negatives,
        copy_rate=copy_rate,
    )


def calibration_png(calibration: Calibration, target_precision: float, title: str) -> bytes:
    """Left: cosine histograms of copies and nearest non-copies; right: precision/recall by threshold."""
    plt = pyplot()

    figure, (histogram, curve) = plt.subplots(1, 2, figsize=FIGURE_SIZE)
    bins = np.linspace(min(0.0, calibration.negatives.min(initial=0.0)), 1.0, HISTOGRAM_BINS + 1)
    histogram.hist(calibration.negatives, bins=bins, alpha=0.6, density=True, label="nearest non-copies")
    histogram.hist(calibration.positives, bins=bins, alpha=0.6, density=True, label="synthetic copies")
    histogram.axvline(
        calibration.threshold, color="black", linestyle="--", label=f"threshold {calibration.threshold:.3f}"
    )
    histogram.set(xlabel="cosine similarity", ylabel="density", title=title)
    histogram.legend(fontsize="small")
    grid = np.linspace(0.0, 1.0, 201)
    precision, recall = calibration.curve(grid)
    curve.plot(grid, precision, label="precision (estimated)")
    curve.plot(grid, recall, label="recall (synthetic copies)")
    curve.axhline(target_precision, color="grey", linestyle=":", label=f"target {target_precision}")
    curve.axvline(calibration.threshold, color="black", linestyle="--")
    curve.set(xlabel="threshold (edges: cosine > threshold)", ylim=(0, 1.02))
    curve.legend(fontsize="small")
    return figure_png(figure, DPI)
