"""SSCD's loss in closed form, and calibration recovering a known threshold from synthetic cosines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from curation.copydetect.calibrate import CalibrationConfig, choose_threshold, precision_recall
from curation.copydetect.loss import copy_loss

TEMPERATURE = 0.05
ENTROPY_WEIGHT = 10.0


def test_copy_loss_matches_its_closed_form_on_two_images_of_two_views():
    angle = 0.5
    c = math.cos(angle)
    # Views of image 0 at 0 and `angle` radians, of image 1 opposite them: every row sees the same
    # positive (cosine c) and negatives (cosines -1 and -c), so the batch mean is one row's loss.
    descriptors = torch.tensor(
        [[1.0, 0.0], [c, math.sin(angle)], [-1.0, 0.0], [-c, -math.sin(angle)]], dtype=torch.float64
    )
    sources = torch.eye(2, dtype=torch.float64).repeat_interleave(2, dim=0)
    loss = copy_loss(descriptors, sources, TEMPERATURE, ENTROPY_WEIGHT)
    positive = math.exp(c / TEMPERATURE)
    infonce = -math.log(positive / (positive + math.exp(-1 / TEMPERATURE) + math.exp(-c / TEMPERATURE)))
    log_distance = math.log(math.sqrt(2 + 2 * c))  # the nearest negative is at cosine -c
    assert float(loss.infonce) == pytest.approx(infonce, rel=1e-9)
    assert float(loss.entropy) == pytest.approx(log_distance, rel=1e-9)
    assert float(loss.total) == pytest.approx(infonce - ENTROPY_WEIGHT * log_distance, rel=1e-9)
    assert loss.positive_similarity == pytest.approx(c) and loss.hardest_negative_similarity == pytest.approx(
        -c
    )


def test_a_mixed_view_counts_both_of_its_images_as_positives():
    descriptors = torch.nn.functional.normalize(torch.randn(6, 8, dtype=torch.float64), dim=1)
    plain = torch.eye(3, dtype=torch.float64).repeat_interleave(2, dim=0)
    mixed = plain.clone()
    mixed[5] = mixed[5] + plain[0]  # view 5 shows image 2 and image 0
    # Row 5's positives: rows 4, 0, 1; its only negatives: rows 2, 3.
    loss = copy_loss(descriptors, mixed, TEMPERATURE, 0.0)
    plain_loss = copy_loss(descriptors, plain, TEMPERATURE, 0.0)
    assert float(loss.infonce) != pytest.approx(float(plain_loss.infonce))
    similarity = (descriptors @ descriptors.T / TEMPERATURE).numpy()
    negatives = np.logaddexp(similarity[5, 2], similarity[5, 3])
    row5 = np.mean([-(similarity[5, j] - np.logaddexp(similarity[5, j], negatives)) for j in (4, 0, 1)])
    rows = [_row_loss(similarity, row, mixed.numpy()) for row in range(6)]
    assert rows[5] == pytest.approx(row5)
    assert float(loss.infonce) == pytest.approx(np.mean(rows))


def _row_loss(similarity: np.ndarray, row: int, sources: np.ndarray) -> float:
    same = (sources > 0).astype(float) @ (sources > 0).T.astype(float) > 0
    positives = [j for j in range(len(same)) if same[row, j] and j != row]
    negatives = np.logaddexp.reduce([similarity[row, k] for k in range(len(same)) if not same[row, k]])
    return float(
        np.mean([-(similarity[row, j] - np.logaddexp(similarity[row, j], negatives)) for j in positives])
    )


# Copies uniform on (0.6, 1), one nearest non-copy per copy uniform on (0, 0.7): on the overlap,
# recall = (1 - t) / 0.4 and false edges per row = (0.7 - t) / 0.7, so precision(t) = rate * recall /
# (rate * recall + false) reaches 0.95 where rate * (1 - t) / 0.4 = 19 (0.7 - t) / 0.7.
def _known_threshold(rate: float) -> float:
    return (19 / 0.7 * 0.7 - rate / 0.4) / (19 / 0.7 - rate / 0.4)


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_calibration_recovers_the_threshold_of_known_distributions(rate):
    count = 40_000
    positives = np.linspace(0.6, 1.0, count, endpoint=False) + 0.2 / count
    negatives = np.linspace(0.0, 0.7, count, endpoint=False) + 0.35 / count
    chosen = choose_threshold(positives, negatives, 0.95, rate)
    assert chosen.reached_target
    assert chosen.threshold == pytest.approx(_known_threshold(rate), abs=1e-3)
    assert chosen.precision == pytest.approx(0.95, abs=1e-3)
    assert chosen.recall == pytest.approx((1 - _known_threshold(rate)) / 0.4, abs=1e-3)


def test_precision_and_recall_count_pairs_strictly_above_the_threshold():
    positives = np.array([0.5, 0.8, 0.9, 0.95])
    negatives = np.array([0.1, 0.6, 0.85, 0.9, 0.2, 0.3, 0.4, 0.7])  # two per sampled row
    precision, recall = precision_recall(positives, negatives, np.array([0.0, 0.8, 0.9, 0.95]), 1.0)
    np.testing.assert_allclose(recall, [1.0, 0.5, 0.25, 0.0])
    # At 0.8: copies 0.9, 0.95 (2 of 4 rows) against non-copies 0.85, 0.9 (2 per 4 rows).
    np.testing.assert_allclose(precision, [4 / 12, 0.5, 1.0, 1.0])


def test_an_unreachable_target_takes_the_most_precise_threshold_and_says_so():
    positives = np.array([0.5, 0.6, 0.7])
    negatives = np.array([0.65, 0.75, 0.8])
    chosen = choose_threshold(positives, negatives, 0.95, 1.0)
    assert not chosen.reached_target
    # The best is just under the lowest copy: all 3 copies against the 3 non-copies, precision 1/2.
    assert chosen.threshold == pytest.approx(0.5, abs=1e-5) and chosen.threshold < 0.5
    assert chosen.precision == pytest.approx(0.5) and chosen.recall == 1.0


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"target_precision": 1.0}, "target_precision"),
        ({"copy_rate": 0.0}, "copy_rate"),
        ({"sample_rows": 0}, "sample_rows"),
    ],
)
def test_calibration_settings_are_checked(values, message):
    with pytest.raises(ValueError, match=message):
        CalibrationConfig(**values)
