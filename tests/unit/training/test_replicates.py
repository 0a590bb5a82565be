"""Replicate statistics: each arm's mean and sample std, the paired difference and its Student-t interval."""

from __future__ import annotations

import math

import pytest

from training.eval.replicates import paired_difference, spread

# Student's t quantile for a two-sided 95% interval with 2 degrees of freedom (3 replicates), from tables.
T_975_DF2 = 4.302652729911275


def test_spread_is_the_mean_and_the_sample_std():
    result = spread([0.70, 0.72, 0.74])
    assert result.mean == pytest.approx(0.72, abs=1e-15)
    assert result.std == pytest.approx(0.02, abs=1e-15)  # ddof 1: sqrt((0.02^2 + 0 + 0.02^2) / 2)
    assert result.count == 3
    assert spread([0.5]).std == 0.0


def test_a_consistent_gain_is_beyond_the_seed_noise():
    # Differences 0.10, 0.09, 0.08: mean 0.09, std 0.01, interval 0.09 -/+ t * 0.01 / sqrt(3).
    paired = paired_difference([0.70, 0.72, 0.74], [0.60, 0.63, 0.66])
    half_width = T_975_DF2 * 0.01 / math.sqrt(3)
    assert paired.mean == pytest.approx(0.09, abs=1e-12) and paired.std == pytest.approx(0.01, abs=1e-12)
    assert (paired.low, paired.high) == pytest.approx((0.09 - half_width, 0.09 + half_width), abs=1e-12)
    assert paired.beyond_noise


def test_a_gain_smaller_than_its_spread_is_within_the_noise():
    # Differences 0.05, -0.03, 0.01: mean 0.01, std 0.04, interval crosses 0.
    paired = paired_difference([0.65, 0.57, 0.61], [0.60, 0.60, 0.60])
    assert paired.mean == pytest.approx(0.01, abs=1e-12) and paired.std == pytest.approx(0.04, abs=1e-12)
    assert paired.low < 0 < paired.high and not paired.beyond_noise


def test_one_replicate_has_no_interval_and_never_claims_a_difference():
    paired = paired_difference([0.7], [0.5])
    assert paired.mean == pytest.approx(0.2) and paired.std == 0.0
    assert math.isnan(paired.low) and math.isnan(paired.high) and not paired.beyond_noise


def test_unpaired_arms_are_refused():
    with pytest.raises(ValueError, match="paired replicates must match: 3 vs 2"):
        paired_difference([0.1, 0.2, 0.3], [0.1, 0.2])
