"""k-NN on frozen features: a hand-worked 5-point example and a brute-force loop reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.eval.knn import knn_accuracy, knn_classify

COS_30 = math.cos(math.radians(30))
SIN_30 = math.sin(math.radians(30))

# Five train points (norms differ on purpose: k-NN must compare directions only) and their classes.
TRAIN_5 = np.array([[5.0, 0.0], [COS_30, SIN_30], [0.2 * COS_30, -0.2 * SIN_30], [0.0, 1.0], [-3.0, 0.0]])
LABELS_5 = np.array([0, 1, 1, 0, 2])
# Query (2, 0): cosines 1, 0.866, 0.866, 0, -1.  Query (-1, 0): cosines -1, -0.866, -0.866, 0, 1.
QUERIES = np.array([[2.0, 0.0], [-1.0, 0.0]])


def test_five_points_at_temperature_one():
    # Query 1, weights prop. to e^cos: class 0 gets e^1 = 2.718 from the first neighbour, class 1 gets
    # 2 e^0.866 = 4.755 from the next two, then class 0 gains e^0 = 1 and class 2 e^-1 = 0.368.
    #   k=1: class 0.  k=3: 2.718 < 4.755 -> class 1.  k=5: 3.718 < 4.755 -> class 1 (k=200 uses all 5).
    # Dot products of the raw vectors would rank (5, 0) far first and give class 0 at k=3.
    # Query 2: class 2 gets e^1 = 2.718 from its nearest point, class 0 at most e^0 + e^-1 = 1.368 and
    # class 1 at most 2 e^-0.866 = 0.841: class 2 for every k.
    predictions = knn_classify(TRAIN_5, LABELS_5, QUERIES, ks=(1, 3, 5, 200), temperature=1.0)
    assert {k: p.tolist() for k, p in predictions.items()} == {1: [0, 2], 3: [1, 2], 5: [1, 2], 200: [1, 2]}


def test_five_points_at_the_default_temperature():
    # T = 0.07, k=3: class 0 scores e^(1/0.07), class 1 scores 2 e^(0.866/0.07); their ratio is
    # e^(0.134/0.07) / 2 = 3.39 > 1, so the sharp temperature keeps class 0.  At k=5 the extra weights
    # are e^(0/0.07) and e^(-1/0.07): negligible, still class 0.
    predictions = knn_classify(TRAIN_5, LABELS_5, QUERIES[:1], ks=(3, 5))
    assert math.exp((1 - COS_30) / 0.07) / 2 > 1
    assert predictions[3].tolist() == [0] and predictions[5].tolist() == [0]


def reference_knn(
    train: np.ndarray, labels: np.ndarray, test: np.ndarray, ks: tuple[int, ...], temperature: float
) -> dict[int, np.ndarray]:
    """Plain loops in float64: cosine, top max_k, softmax over them, weighted votes of the first k."""
    num_classes = labels.max() + 1
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    max_k = min(max(ks), len(train))
    predictions = {k: [] for k in ks}
    for query in test:
        sims = train @ (query / np.linalg.norm(query))
        nearest = np.argsort(-sims, kind="stable")[:max_k]
        weights = np.exp(sims[nearest] / temperature)
        weights /= weights.sum()
        for k in ks:
            scores = np.zeros(num_classes)
            for rank in range(min(k, max_k)):
                scores[labels[nearest[rank]]] += weights[rank]
            predictions[k].append(int(np.argmax(scores)))
    return {k: np.array(p) for k, p in predictions.items()}


def random_problem(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    num_train, num_test, dim, num_classes = 40, 13, 8, 4
    return (
        rng.normal(size=(num_train, dim)),
        rng.integers(0, num_classes, num_train),
        rng.normal(size=(num_test, dim)),
        rng.integers(0, num_classes, num_test),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_matches_brute_force_in_chunks(seed, temperature):
    train, labels, test, _ = random_problem(seed)
    ks = (1, 5, 10, 100)  # 100 > 40 train rows: clamped to all of them
    expected = reference_knn(train, labels, test, ks, temperature)
    for chunk_size in (5, 1000):  # 13 test rows: chunks of 5, 5, 3, then one chunk
        predictions = knn_classify(train, labels, test, ks=ks, temperature=temperature, chunk_size=chunk_size)
        assert set(predictions) == set(ks)
        for k in ks:
            np.testing.assert_array_equal(predictions[k], expected[k])


def test_accuracy_is_the_fraction_of_correct_predictions():
    train, labels, test, test_labels = random_problem(seed=3)
    ks = (1, 10)
    expected = reference_knn(train, labels, test, ks, 0.07)
    accuracy = knn_accuracy(train, labels, test, test_labels, ks=ks, num_classes=4)
    assert accuracy == pytest.approx({k: np.count_nonzero(expected[k] == test_labels) / 13 for k in ks})


def test_well_separated_clusters_are_all_right():
    # Four directions, tight noise: every test point's neighbours share its class.
    rng = np.random.default_rng(4)
    centres = np.eye(4) * 10
    labels = np.repeat(np.arange(4), 10)
    train = centres[labels] + rng.normal(scale=0.1, size=(40, 4))
    test = centres[labels[::5]] + rng.normal(scale=0.1, size=(8, 4))
    assert knn_accuracy(train, labels, test, labels[::5], ks=(10, 20)) == {10: 1.0, 20: 1.0}


def test_bad_inputs_raise():
    train, labels, test, _ = random_problem(seed=5)
    with pytest.raises(ValueError, match="features"):
        knn_classify(train, labels, test[:, :3])
    with pytest.raises(ValueError, match="labels"):
        knn_classify(train, labels, test, num_classes=2)
    with pytest.raises(ValueError, match="ks"):
        knn_classify(train, labels, test, ks=(0,))
