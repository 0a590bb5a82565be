"""The `evaluate` stage and its datasets: rows per model, accuracies recomputed, reuse, folder data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipelines.stage import Manifest, run_stage
from pipelines.store import Store
from training.checkpoint import EXPORT_INFO_SUFFIX
from training.eval.config import EvalDatasetConfig, EvaluateConfig
from training.eval.datasets import (
    UnreadableImageError,
    balanced_quotas,
    balanced_subset,
    load_eval_split,
)
from training.eval.features import eval_transform, extract_features
from training.eval.knn import knn_accuracy
from training.eval.linear import linear_probe
from training.eval.stage import EVAL_RESULTS, EVALUATE, RAW_PIXELS_MODEL
from training.exports import EXPORTS, export_row, load_exported_backbone, save_backbone
from training.models.vit import build_vit_from_options

SMALL_IMAGE = 28  # four 7 px patches a side
PATCH = 7
TINY_DEPTH = 2  # vit_test: the probe can use the last block only (cls_last1, cls_last1+avgpool)
FASHION_CLASSES = 10
TRAIN_LIMIT = 200
TEST_LIMIT = 100
KS = (10, 20)
LRS = (1e-3, 1e-2)
MODELS = ("teacher", "student")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WEIGHT_STD = 0.2


def tiny_options() -> dict:
    return {
        "arch": "vit_test",
        "patch_size": PATCH,
        "img_size": SMALL_IMAGE,
        "num_register_tokens": 0,
        "ffn_layer": "mlp",
        "interpolate_offset": 0.1,
        "interpolate_antialias": False,
    }


def random_backbone(seed: int) -> torch.nn.Module:
    """A tiny ViT with every weight drawn from N(0, 0.2).

    Why not the ViT's own init: its small weights leave the CLS almost the same for every image (cosine
    similarities within 1e-6 of 1), so k-NN would be decided by rounding.
    """
    backbone = build_vit_from_options(tiny_options())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in backbone.parameters():
            parameter.normal_(0.0, WEIGHT_STD, generator=generator)
    return backbone


def exports_manifest(folder: Path, models: tuple[str, ...]) -> Manifest:
    """Random tiny backbones (a seed per model) saved in hub format, as a one-part exports manifest."""
    rows = []
    for seed, model in enumerate(models):
        path = save_backbone(random_backbone(seed), tiny_options(), folder / f"{model}.pth")
        rows.append(export_row(model, path))
    table = EXPORTS.table_from_rows(rows)
    manifest_dir = folder / "exports"
    manifest_dir.mkdir()
    pq.write_table(table, manifest_dir / "part-all.parquet")
    digest = "-".join(row["sha256"] for row in rows)
    return Manifest(uri=str(manifest_dir), schema_name=EXPORTS.name, digest=digest, num_rows=len(rows))


def evaluate_config(dataset: EvalDatasetConfig, **options) -> EvaluateConfig:
    values = {
        "resize_size": SMALL_IMAGE,
        "crop_size": SMALL_IMAGE,
        "batch_size": 64,
        "knn_ks": KS,
        "linear_lrs": LRS,
        "linear_epochs": 2,
        "linear_batch_size": 32,
        "val_fraction": 0.2,
        "seed": 3,
    }
    return EvaluateConfig(dataset=dataset, **(values | options))


def results_by_model(table: pa.Table) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        grouped.setdefault(row["model"], []).append(row)
    return grouped


# -- exports and datasets ---------------------------------------------------------------------------------


def test_save_backbone_round_trips_through_an_exports_row(tmp_path):
    backbone = random_backbone(seed=0)
    path = save_backbone(backbone, tiny_options(), tmp_path / "nested" / "backbone.pth")
    assert json.loads(path.with_name(path.name + EXPORT_INFO_SUFFIX).read_text()) == tiny_options()
    row = export_row("teacher", path)
    assert row["parameters"] == sum(tensor.numel() for tensor in backbone.state_dict().values())
    loaded = load_exported_backbone(row)
    for name, tensor in backbone.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=0, rtol=0)
    assert not list(path.parent.glob("*.tmp-*"))


def test_balanced_quotas_share_evenly_and_give_small_classes_all_they_have():
    # 10 rows over 3 classes: 4, 3, 3 (the extra row to the lowest id).
    assert balanced_quotas([50, 50, 50], 10).tolist() == [4, 3, 3]
    # Class 1 holds only 2: it gives both and the other 9 split 5 / 4 between classes 0 and 2.
    assert balanced_quotas([50, 2, 50], 11).tolist() == [5, 2, 4]
    # 0 and a limit above the total both take every row; an empty class takes none.
    assert balanced_quotas([3, 0, 4], 0).tolist() == [3, 0, 4]
    assert balanced_quotas([3, 0, 4], 100).tolist() == [3, 0, 4]
    assert balanced_quotas([3, 0, 4], 5).tolist() == [3, 0, 2]


def test_balanced_subset_is_seeded_sorted_and_within_each_class():
    labels = np.repeat(np.arange(4), [30, 5, 20, 25])
    rows = balanced_subset(labels, 24, seed=7)
    assert np.array_equal(rows, np.sort(rows)) and len(np.unique(rows)) == 24
    assert np.bincount(labels[rows], minlength=4).tolist() == [7, 5, 6, 6]
    assert np.array_equal(rows, balanced_subset(labels, 24, seed=7))
    assert not np.array_equal(rows, balanced_subset(labels, 24, seed=8))


def test_fashion_mnist_split_is_a_balanced_rgb_subset_of_the_package():
    cfg = EvalDatasetConfig(kind="fashion_mnist", train_limit=30, test_limit=20)
    train = load_eval_split(cfg, "train", seed=1)
    assert len(train) == 30 and len(train.class_names) == FASHION_CLASSES
    assert np.bincount(train.labels_N, minlength=FASHION_CLASSES).tolist() == [3] * FASHION_CLASSES
    image = next(train.images())
    assert image.mode == "RGB" and image.size == (SMALL_IMAGE, SMALL_IMAGE)
    red, green, blue = (np.asarray(channel) for channel in image.split())
    assert np.array_equal(red, green) and np.array_equal(green, blue)  # grey copied to three channels
    test = load_eval_split(cfg, "test", seed=1)
    assert np.bincount(test.labels_N, minlength=FASHION_CLASSES).tolist() == [2] * FASHION_CLASSES


COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


def write_class_folders(root: Path, per_class: int, classes: tuple[str, ...] = tuple(COLOURS)) -> None:
    """Solid-colour PNGs, one colour per class, in <root>/<class>/ folders (not square: the crop cuts)."""
    for name in classes:
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            Image.new("RGB", (SMALL_IMAGE + 6, SMALL_IMAGE), COLOURS[name]).save(
                root / name / f"{index:03d}.png"
            )


def test_folder_split_labels_by_sorted_train_classes(tmp_path):
    write_class_folders(tmp_path / "train", per_class=3)
    write_class_folders(tmp_path / "test", per_class=2, classes=("green", "red"))
    (tmp_path / "train" / "red" / "notes.txt").write_text("not an image: skipped by its suffix")
    cfg = EvalDatasetConfig(
        kind="folder", train_path=str(tmp_path / "train"), test_path=str(tmp_path / "test")
    )
    train = load_eval_split(cfg, "train", seed=0)
    test = load_eval_split(cfg, "test", seed=0)
    assert train.class_names == test.class_names == ("blue", "green", "red")
    assert train.labels_N.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert test.labels_N.tolist() == [1, 1, 2, 2]
    first_red = list(test.images())[2]
    assert first_red.size == (SMALL_IMAGE + 6, SMALL_IMAGE)
    assert np.unique(np.asarray(first_red).reshape(-1, 3), axis=0).tolist() == [list(COLOURS["red"])]


def test_folder_split_names_an_unreadable_file_and_a_class_train_lacks(tmp_path):
    write_class_folders(tmp_path / "train", per_class=2, classes=("blue", "red"))
    write_class_folders(tmp_path / "test", per_class=1, classes=("green",))
    broken = tmp_path / "train" / "red" / "zz_broken.png"
    broken.write_bytes(PNG_SIGNATURE + b"not really a png")
    cfg = EvalDatasetConfig(
        kind="folder", train_path=str(tmp_path / "train"), test_path=str(tmp_path / "test")
    )
    train = load_eval_split(cfg, "train", seed=0)
    with pytest.raises(UnreadableImageError, match=r"zz_broken\.png"):
        list(train.images())
    with pytest.raises(ValueError, match="'green' is not among the train classes"):
        load_eval_split(cfg, "test", seed=0)


# -- the stage --------------------------------------------------------------------------------------------


def test_evaluate_stage_rows_match_knn_and_probe_on_the_same_features_and_rerun_is_reused(tmp_path):
    exports = exports_manifest(tmp_path / "exports_files", MODELS)
    dataset = EvalDatasetConfig(kind="fashion_mnist", train_limit=TRAIN_LIMIT, test_limit=TEST_LIMIT)
    cfg = evaluate_config(dataset)
    store = Store(tmp_path / "store")
    run = run_stage(EVALUATE, cfg, {"exports": exports}, store=store, show_progress=False)
    assert not run.reused
    results = run.outputs["results"].read(EVAL_RESULTS)
    grouped = results_by_model(results)
    assert list(grouped) == [*MODELS, RAW_PIXELS_MODEL]  # the baseline row after the models

    train = load_eval_split(dataset, "train", cfg.seed)
    test = load_eval_split(dataset, "test", cfg.seed)
    assert (len(train), len(test)) == (TRAIN_LIMIT, TEST_LIMIT)
    transform = eval_transform(SMALL_IMAGE, SMALL_IMAGE)
    for export in exports_table_rows(exports):
        rows = grouped[export["model"]]
        assert [row["setting"] for row in rows if row["protocol"] == "knn"] == [f"k={k}" for k in KS]
        linear_rows = [row for row in rows if row["protocol"] == "linear"]
        assert len(rows) == len(KS) + 1 and len(linear_rows) == 1
        assert {row["parameters"] for row in rows} == {export["parameters"]}
        assert {row["dataset"] for row in rows} == {"fashion_mnist"}

        backbone = load_exported_backbone(export)
        train_features = extract_features(
            backbone, train.images(), batch_size=cfg.batch_size, n_last_blocks=TINY_DEPTH, transform=transform
        )
        test_features = extract_features(
            backbone, test.images(), batch_size=cfg.batch_size, n_last_blocks=TINY_DEPTH, transform=transform
        )
        expected_knn = knn_accuracy(
            train_features.cls_ND,
            train.labels_N,
            test_features.cls_ND,
            test.labels_N,
            ks=KS,
            temperature=cfg.knn_temperature,
            num_classes=FASHION_CLASSES,
        )
        for k in KS:
            (row,) = [row for row in rows if row["setting"] == f"k={k}"]
            assert row["top1"] == pytest.approx(expected_knn[k], abs=1e-12)
        probe = linear_probe(
            train_features,
            train.labels_N,
            test_features,
            test.labels_N,
            lrs=LRS,
            feature_sets=("cls_last1", "cls_last1+avgpool"),
            epochs=cfg.linear_epochs,
            batch_size=cfg.linear_batch_size,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
        )
        assert linear_rows[0]["setting"] == f"{probe.feature_set} lr={probe.lr:g}"
        assert linear_rows[0]["top1"] == pytest.approx(probe.test_accuracy, abs=1e-12)
        stats = run.record["stats"]["models"][export["model"]]
        assert stats["knn_top1_k20"] == pytest.approx(expected_knn[20], abs=1e-12)
        assert stats["linear_top1"] == pytest.approx(probe.test_accuracy, abs=1e-12)

    stage_dir = Path(run.uri)
    table = (stage_dir / "artifacts" / "results.md").read_text()
    assert table.count("\n| ") == 1 + len(MODELS) + 1  # the header, one line per model, raw pixels
    assert f"| {RAW_PIXELS_MODEL} | 0 |" in table
    for export in exports_table_rows(exports):
        assert f"| {export['model']} | {export['parameters']:,} |" in table
    assert (stage_dir / "artifacts" / "results.png").read_bytes().startswith(PNG_SIGNATURE)
    assert run.record["artifacts"] == ["results.md", "results.png"]

    again = run_stage(EVALUATE, cfg, {"exports": exports}, store=store, show_progress=False)
    assert again.reused and again.key == run.key


def brute_force_knn_top1(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    k: int,
    max_k: int,
    t: float,
) -> float:
    """Weighted k-NN written out row by row: cosine to every train row, the max_k nearest, softmax(sim / t)
    over those max_k, and the k nearest's weights summed per class."""
    train_unit = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    correct = 0
    for row, label in zip(test_x, test_y, strict=True):
        sims = train_unit @ (row / np.linalg.norm(row))
        nearest = np.argsort(-sims, kind="stable")[:max_k]
        weights = np.exp(sims[nearest] / t) / np.exp(sims[nearest] / t).sum()
        votes = np.zeros(FASHION_CLASSES)
        for neighbour, weight in zip(nearest[:k], weights[:k], strict=True):
            votes[train_y[neighbour]] += weight
        correct += int(votes.argmax() == label)
    return correct / len(test_y)


def test_raw_pixel_baseline_equals_brute_force_knn_on_the_flattened_eval_pixels(tmp_path):
    exports = exports_manifest(tmp_path / "exports_files", ("teacher",))
    dataset = EvalDatasetConfig(kind="fashion_mnist", train_limit=TRAIN_LIMIT, test_limit=TEST_LIMIT)
    cfg = evaluate_config(dataset)
    run = run_stage(EVALUATE, cfg, {"exports": exports}, store=Store(tmp_path / "store"), show_progress=False)
    rows = results_by_model(run.outputs["results"].read(EVAL_RESULTS))[RAW_PIXELS_MODEL]
    train = load_eval_split(dataset, "train", cfg.seed)
    test = load_eval_split(dataset, "test", cfg.seed)
    transform = eval_transform(SMALL_IMAGE, SMALL_IMAGE)
    train_x = np.stack([transform(image).numpy().ravel() for image in train.images()]).astype(np.float64)
    test_x = np.stack([transform(image).numpy().ravel() for image in test.images()]).astype(np.float64)
    assert train_x.shape == (TRAIN_LIMIT, 3 * SMALL_IMAGE * SMALL_IMAGE)
    knn = {row["setting"]: row["top1"] for row in rows if row["protocol"] == "knn"}
    for k in KS:
        expected = brute_force_knn_top1(
            train_x, train.labels_N, test_x, test.labels_N, k, max(KS), cfg.knn_temperature
        )
        assert knn[f"k={k}"] == pytest.approx(expected, abs=1e-12)
    # Pixels carry the classes: far above the 10% of chance on 10 balanced classes.
    assert knn["k=20"] > 0.5
    (linear,) = [row for row in rows if row["protocol"] == "linear"]
    assert linear["setting"].startswith("cls_last1 ")  # no blocks or patches to pool: the pixels alone
    assert {row["parameters"] for row in rows} == {0}
    assert run.record["stats"]["models"][RAW_PIXELS_MODEL]["parameters"] == 0


def exports_table_rows(exports: Manifest) -> list[dict]:
    return exports.read(EXPORTS).to_pylist()


def test_evaluate_stage_on_class_folders_separates_solid_colours(tmp_path):
    # Every test image is a copy of its class's train images: its 5 most similar train rows (cosine 1) are
    # its own class, so for k <= 5 the prediction is that class and k-NN top-1 is exactly 1.
    write_class_folders(tmp_path / "train", per_class=5)
    write_class_folders(tmp_path / "test", per_class=2)
    dataset = EvalDatasetConfig(
        kind="folder", train_path=str(tmp_path / "train"), test_path=str(tmp_path / "test")
    )
    exports = exports_manifest(tmp_path / "exports_files", ("student_random_init",))
    cfg = evaluate_config(dataset, knn_ks=(1, 5), linear_epochs=1, linear_batch_size=4)
    run = run_stage(EVALUATE, cfg, {"exports": exports}, store=Store(tmp_path / "store"), show_progress=False)
    rows = results_by_model(run.outputs["results"].read(EVAL_RESULTS))["student_random_init"]
    knn = {row["setting"]: row["top1"] for row in rows if row["protocol"] == "knn"}
    assert knn == {"k=1": 1.0, "k=5": 1.0}
    assert [row["protocol"] for row in rows] == ["knn", "knn", "linear"]
    assert {row["dataset"] for row in rows} == {f"folder:{tmp_path / 'train'}"}
    assert run.record["stats"]["train_images"] == 15 and run.record["stats"]["test_images"] == 6
