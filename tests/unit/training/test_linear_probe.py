"""Frozen features and the linear-probe grid: inputs, split, init, SGD trajectory, and the sklearn bar."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from pipelines.images import IMAGENET_MEAN, IMAGENET_STD
from training.eval.features import FeatureSet, eval_transform, extract_features
from training.eval.linear import (
    build_classifier_grid,
    linear_probe,
    probe_inputs,
    stratified_split,
    train_classifier_grid,
)
from training.models.vit import build_vit

SMALL_IMAGE = 28  # two 14 px patches a side
MOMENTUM = 0.9
LR_REFERENCE_BATCH = 256


@pytest.fixture(autouse=True)
def _one_thread():
    # Why: the machine's cores are shared; extra BLAS threads only contend (sklearn's too).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


# -- features --------------------------------------------------------------------------------------------


def test_eval_transform_resizes_the_short_side_then_crops_and_normalises():
    colour = (200, 30, 90)
    image = Image.new("RGB", (20, 10), colour)  # -> 16 x 8 after the resize, 6 x 6 after the crop
    tensor = eval_transform(resize=8, crop=6)(image)
    assert tensor.shape == (3, 6, 6)
    for channel in range(3):
        expected = (colour[channel] / 255 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
        torch.testing.assert_close(tensor[channel], torch.full((6, 6), expected), atol=1e-6, rtol=0)


def noisy_images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    shape = (SMALL_IMAGE + 4, SMALL_IMAGE, 3)  # not square: the transform crops it
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(count)]


def test_extract_features_matches_a_manual_block_walk():
    torch.manual_seed(0)
    backbone = build_vit("vit_test", img_size=SMALL_IMAGE, num_register_tokens=1).eval()
    transform = eval_transform(resize=SMALL_IMAGE, crop=SMALL_IMAGE)
    images = noisy_images(5)
    features = extract_features(backbone, iter(images), batch_size=2, n_last_blocks=2, transform=transform)

    with torch.no_grad():
        x_BCHW = torch.stack([transform(image) for image in images])
        tokens = backbone.prepare_tokens(x_BCHW)
        after_block0 = backbone.blocks[0](tokens)
        expected_cls0 = backbone.norm(after_block0)[:, 0]
        expected_cls1 = backbone(x_BCHW)  # the final-normed CLS
        patches = backbone.forward_features(x_BCHW)["x_norm_patchtokens"]  # registers excluded
    assert features.block_cls_NLD.dtype == np.float32 and features.block_cls_NLD.shape == (5, 2, 64)
    np.testing.assert_allclose(features.block_cls_NLD[:, 0], expected_cls0.numpy(), atol=1e-5)
    np.testing.assert_allclose(features.cls_ND, expected_cls1.numpy(), atol=1e-5)
    np.testing.assert_allclose(features.patch_mean_ND, patches.mean(dim=1).numpy(), atol=1e-5)


def test_extract_features_under_bfloat16_autocast_stays_close():
    torch.manual_seed(0)
    backbone = build_vit("vit_test", img_size=SMALL_IMAGE)
    transform = eval_transform(resize=SMALL_IMAGE, crop=SMALL_IMAGE)
    images = noisy_images(3)
    exact = extract_features(backbone, images, batch_size=3, n_last_blocks=1, transform=transform)
    autocast = extract_features(
        backbone, images, batch_size=3, n_last_blocks=1, transform=transform, autocast_dtype=torch.bfloat16
    )
    assert autocast.cls_ND.dtype == np.float32
    # LayerNorm outputs are O(1); bfloat16 keeps 8 bits of mantissa.
    np.testing.assert_allclose(autocast.cls_ND, exact.cls_ND, atol=0.1)


# -- probe inputs, split, init ---------------------------------------------------------------------------


def counting_features(num: int = 3, num_blocks: int = 4, dim: int = 2) -> FeatureSet:
    block_cls = np.arange(num * num_blocks * dim, dtype=np.float32).reshape(num, num_blocks, dim)
    return FeatureSet(block_cls, -np.arange(num * dim, dtype=np.float32).reshape(num, dim))


def test_probe_inputs_concatenate_block_cls_oldest_first_then_the_patch_mean():
    features = counting_features()
    row = 1  # block CLS of row 1: blocks 0..3 hold [8, 9], [10, 11], [12, 13], [14, 15]; patch mean [-2, -3]
    assert probe_inputs(features, "cls_last1")[row].tolist() == [14, 15]
    assert probe_inputs(features, "cls_last1+avgpool")[row].tolist() == [14, 15, -2, -3]
    assert probe_inputs(features, "cls_last4")[row].tolist() == list(range(8, 16))
    assert probe_inputs(features, "cls_last4+avgpool")[row].tolist() == [*range(8, 16), -2, -3]


def test_probe_inputs_reject_more_blocks_than_extracted_and_unknown_names():
    features = counting_features(num_blocks=2)
    with pytest.raises(ValueError, match="n_last_blocks=4"):
        probe_inputs(features, "cls_last4")
    with pytest.raises(ValueError, match="unknown feature set"):
        probe_inputs(features, "cls_last2")


def test_stratified_split_takes_the_rounded_fraction_of_every_class():
    counts = [10, 25, 4, 1]  # 10% of each: 1, 2.5 -> 3, 0.4 -> 0, 0.1 -> 0
    labels = np.repeat(np.arange(4), counts)
    np.random.default_rng(0).shuffle(labels)
    fit, val = stratified_split(labels, 0.1, seed=7)
    assert np.bincount(labels[val], minlength=4).tolist() == [1, 3, 0, 0]
    assert sorted([*fit, *val]) == list(range(len(labels)))
    _, reval = stratified_split(labels, 0.1, seed=7)
    np.testing.assert_array_equal(reval, val)
    assert any(not np.array_equal(stratified_split(labels, 0.1, seed)[1], val) for seed in range(8, 12))


def test_classifier_grid_init_is_normal_001_weights_and_zero_bias_in_grid_order():
    grid = build_classifier_grid({"wide": 1000, "narrow": 3}, lrs=(0.1, 0.2), num_classes=20, seed=0)
    assert list(grid) == [("wide", 0.1), ("wide", 0.2), ("narrow", 0.1), ("narrow", 0.2)]
    weight = grid["wide", 0.1].weight.detach()
    assert weight.shape == (20, 1000)
    assert abs(weight.std().item() - 0.01) < 0.0003 and abs(weight.mean().item()) < 0.0003
    assert all(not layer.bias.any() for layer in grid.values())
    again = build_classifier_grid({"wide": 1000, "narrow": 3}, lrs=(0.1, 0.2), num_classes=20, seed=0)
    torch.testing.assert_close(again["narrow", 0.2].weight, grid["narrow", 0.2].weight, atol=0, rtol=0)


# -- training: SGD momentum, cosine to 0, CE per classifier ----------------------------------------------


def reference_sgd(
    x: np.ndarray, labels: np.ndarray, weight: np.ndarray, bias: np.ndarray, lr: float, num_steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Full-gradient steps of mean CE in float64: buf = g, then 0.9 buf + g; lr cosine-annealed to 0."""
    one_hot = np.eye(weight.shape[0])[labels]
    buffers = None
    for step in range(num_steps):
        logits = x @ weight.T + bias
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        grads = ((probs - one_hot).T @ x / len(x), (probs - one_hot).mean(axis=0))
        buffers = (
            grads if buffers is None else tuple(MOMENTUM * b + g for b, g in zip(buffers, grads, strict=True))
        )
        step_lr = lr * (1 + math.cos(math.pi * step / num_steps)) / 2
        weight, bias = weight - step_lr * buffers[0], bias - step_lr * buffers[1]
    return weight, bias


def initial_state(grid: dict) -> dict:
    return {
        key: (layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy())
        for key, layer in grid.items()
    }


def test_full_batch_training_follows_the_sgd_reference_per_classifier():
    rng = np.random.default_rng(1)
    num_rows, num_classes, epochs = 12, 3, 4
    inputs = {"a": rng.normal(size=(num_rows, 3)), "b": rng.normal(size=(num_rows, 5))}
    labels = rng.integers(0, num_classes, num_rows)
    grid = build_classifier_grid({"a": 3, "b": 5}, lrs=(1.0, 20.0), num_classes=num_classes, seed=0)
    start = initial_state(grid)
    train_classifier_grid(
        grid,
        {name: torch.tensor(x, dtype=torch.float32) for name, x in inputs.items()},
        torch.tensor(labels),
        epochs=epochs,
        batch_size=num_rows,  # one batch per epoch: the shuffle order cannot matter
        seed=0,
    )
    for (name, lr), layer in grid.items():
        scaled_lr = lr * num_rows / LR_REFERENCE_BATCH
        weight, bias = reference_sgd(inputs[name], labels, *start[name, lr], scaled_lr, num_steps=epochs)
        assert not np.allclose(weight, start[name, lr][0], atol=1e-3)  # it moved
        np.testing.assert_allclose(layer.weight.detach().numpy(), weight, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(layer.bias.detach().numpy(), bias, rtol=1e-4, atol=1e-6)


def test_minibatches_anneal_over_every_batch_of_every_epoch():
    # Identical rows make every batch (2, 2, then 1 of 5 rows) give the same gradient, so the run is
    # epochs * ceil(5 / 2) = 6 reference steps with the lr scaled by 2 / 256.
    row, label, num_rows, batch_size, epochs, lr = np.array([[0.5, -1.0, 2.0]]), 2, 5, 2, 2, 30.0
    grid = build_classifier_grid({"a": 3}, lrs=(lr,), num_classes=4, seed=3)
    start = initial_state(grid)
    x = torch.tensor(np.repeat(row, num_rows, axis=0), dtype=torch.float32)
    train_classifier_grid(
        grid, {"a": x}, torch.full((num_rows,), label), epochs=epochs, batch_size=batch_size, seed=0
    )
    scaled_lr = lr * batch_size / LR_REFERENCE_BATCH
    weight, bias = reference_sgd(row, np.array([label]), *start["a", lr], scaled_lr, num_steps=6)
    np.testing.assert_allclose(grid["a", lr].weight.detach().numpy(), weight, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grid["a", lr].bias.detach().numpy(), bias, rtol=1e-4, atol=1e-6)


# -- the whole probe --------------------------------------------------------------------------------------


def test_probe_picks_the_feature_set_that_carries_the_classes():
    # The classes live only in the patch mean (4 blobs far apart); every block CLS is noise.
    rng = np.random.default_rng(2)
    num_rows, dim = 240, 6
    labels = np.tile(np.arange(4), num_rows // 4)
    centres = rng.normal(scale=4.0, size=(4, dim))
    features = FeatureSet(
        rng.normal(size=(num_rows, 4, dim)).astype(np.float32),
        (centres[labels] + rng.normal(scale=0.3, size=(num_rows, dim))).astype(np.float32),
    )
    train, test = np.arange(160), np.arange(160, num_rows)
    result = linear_probe(
        features.subset(train), labels[train], features.subset(test), labels[test], epochs=5, batch_size=16
    )
    assert len(result.grid) == 4 * 13
    assert result.feature_set in {"cls_last1+avgpool", "cls_last4+avgpool"}
    assert result.val_accuracy == 1.0 and result.test_accuracy == 1.0
    first_best = next(row for row in result.grid if row.val_accuracy == result.val_accuracy)
    assert (result.feature_set, result.lr) == (first_best.feature_set, first_best.lr)
    noise_only = [row.val_accuracy for row in result.grid if not row.feature_set.endswith("avgpool")]
    assert max(noise_only) < 0.9


def test_probe_rejects_an_empty_val_part_and_duplicate_lrs():
    features, labels = counting_features(num=3), np.array([0, 1, 2])  # one row per class: 10% rounds to 0
    with pytest.raises(ValueError, match="empty fit or val"):
        linear_probe(features, labels, features, labels, feature_sets=("cls_last1",))
    with pytest.raises(ValueError, match="distinct"):
        linear_probe(features, labels, features, labels, lrs=(0.1, 0.1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_probe_on_digits_is_within_one_point_of_logistic_regression(seed):
    pixels, labels = load_digits(return_X_y=True)
    pixels = pixels.astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(labels))
    test, train = order[:500], order[500:]

    def as_features(rows: np.ndarray) -> FeatureSet:
        return FeatureSet(pixels[rows][:, None, :], np.zeros_like(pixels[rows]))

    result = linear_probe(
        as_features(train),
        labels[train],
        as_features(test),
        labels[test],
        feature_sets=("cls_last1",),
        epochs=30,
        batch_size=64,
        seed=seed,
    )
    # sklearn's baseline: C chosen on the probe's own val split, fit on the rest, scored on test.
    fit, val = stratified_split(labels[train], 0.1, seed)
    train_x, train_y = pixels[train].astype(np.float64), labels[train]  # lbfgs is slow on float32
    baselines = [
        LogisticRegression(C=c, max_iter=5000).fit(train_x[fit], train_y[fit])
        for c in (1e-3, 1e-2, 1e-1, 1.0)
    ]
    best = max(baselines, key=lambda model: model.score(train_x[val], train_y[val]))
    assert abs(result.test_accuracy - best.score(pixels[test], labels[test])) <= 0.01
