"""Seed replicates of a comparison: each arm's mean and spread, and the paired difference of two arms.

    accuracy of arm A and arm B in replicate r (same seed r for both)
      --spread--> per arm: mean, sample std (ddof 1)
      --paired_difference--> A_r - B_r: mean, std, the 95% Student-t interval of the mean, and whether
        that interval excludes 0 (the difference is beyond the seed noise)

Why paired: both arms of replicate r share the training seed (initial weights, the draws of every
batch), so A_r - B_r cancels what the seed does to both, and its own spread is the noise the difference
has to beat. With one replicate there is no spread: std is 0 and the interval is undefined (NaN).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95


@dataclass(frozen=True, slots=True)
class Spread:
    """One arm's values over its replicates."""

    mean: float
    std: float  # sample std (ddof 1); 0 for a single replicate
    count: int


@dataclass(frozen=True, slots=True)
class PairedDifference:
    """A_r - B_r over replicates r, with the CONFIDENCE Student-t interval of its mean."""

    mean: float
    std: float
    count: int
    low: float  # NaN for a single replicate
    high: float

    @property
    def beyond_noise(self) -> bool:
        """The interval excludes 0: the arms differ by more than the seeds make them differ."""
        return self.count >= 2 and (self.low > 0 or self.high < 0)


def spread(values: Sequence[float]) -> Spread:
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("spread of no replicates")
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return Spread(float(array.mean()), std, int(array.size))


def paired_difference(first: Sequence[float], second: Sequence[float]) -> PairedDifference:
    """first[r] - second[r] over replicates r.

    Raises:
        ValueError: the arms have different numbers of replicates, or none.
    """
    if len(first) != len(second):
        raise ValueError(f"paired replicates must match: {len(first)} vs {len(second)}")
    differences = spread(np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64))
    if differences.count < 2:
        return PairedDifference(differences.mean, 0.0, differences.count, math.nan, math.nan)
    # Why imported here: scipy.stats costs every training process ~100 MB, and only this needs it.
    from scipy import stats

    quantile = float(stats.t.ppf((1 + CONFIDENCE) / 2, differences.count - 1))
    half_width = quantile * differences.std / math.sqrt(differences.count)
    return PairedDifference(
        differences.mean,
        differences.std,
        differences.count,
        differences.mean - half_width,
        differences.mean + half_width,
    )
