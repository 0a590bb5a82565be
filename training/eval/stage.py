"""The `evaluate` stage: k-NN and the linear probe on frozen features of every exported backbone.

    exports manifest (one row per model) + labelled train/test images (EvalDatasetConfig)
      --raw pixels (the baseline): the eval transform's tensors, flattened
    --per model: load_exported_backbone --> extract_features(train), extract_features(test)
          --> knn_accuracy for each k (last block's CLS) + linear_probe (CLS of the last 1 or 4 blocks,
              +/- patch mean, only the feature sets the depth allows)
      --> `results` manifest (one row per (model, k), one per model's chosen probe; models, then raw_pixels),
          artifacts/results.md (table) and artifacts/results.png (bar chart)

Accuracies are fractions in [0, 1] in the manifest and percentages in the table and chart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.stage import Manifest, StageContext, StageSpec, register_stage
from training.eval.config import EvaluateConfig
from training.eval.datasets import LabelledImages, dataset_name, load_eval_split
from training.eval.features import (
    LINEAR_PROBE_BLOCKS,
    FeatureSet,
    eval_transform,
    extract_features,
    raw_pixel_features,
)
from training.eval.knn import knn_accuracy
from training.eval.linear import FEATURE_SETS, linear_probe
from training.eval.results import (
    EVAL_RESULTS,
    ModelResult,
    accuracy_tables,
    probe_setting,
    result_rows,
    results_chart_png,
    results_markdown,
)
from training.exports import EXPORTS, load_exported_backbone, read_exports

RESULTS_TABLE_FILE = "results.md"
RESULTS_CHART_FILE = "results.png"
RAW_PIXELS_MODEL = "raw_pixels"  # the baseline row in every accuracy table
REPORTED_K = 20  # the k the official k-NN help text recommends; stats fall back to the first k
SECONDS_DIGITS = 3


def probe_feature_sets(features: FeatureSet) -> list[str]:
    """The linear-probe inputs these features hold enough blocks (and patches) for."""
    return [
        name
        for name, spec in FEATURE_SETS.items()
        if spec.num_blocks <= features.num_blocks and (features.has_patches or not spec.avgpool)
    ]


def choose_device() -> torch.device:
    """A GPU when there is one: features, k-NN and the probe are all batched tensor work."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def timed_split_features(
    extract: Callable[[str, LabelledImages], FeatureSet], train: LabelledImages, test: LabelledImages
) -> tuple[dict[str, FeatureSet], float]:
    """`extract(split name, split)` for train and test, and the seconds both took."""
    started = time.perf_counter()
    features = {name: extract(name, split) for name, split in (("train", train), ("test", test))}
    return features, time.perf_counter() - started


def evaluate_backbone(
    export: Mapping[str, Any],
    train: LabelledImages,
    test: LabelledImages,
    cfg: EvaluateConfig,
    *,
    device: torch.device,
    show_progress: bool,
) -> ModelResult:
    """k-NN for every k and (if configured) the linear probe, on one extraction of each split's features."""
    backbone = load_exported_backbone(dict(export))
    depth = len(backbone.blocks)
    transform = eval_transform(cfg.resize_size, cfg.crop_size)
    features, seconds = timed_split_features(
        lambda name, split: extract_features(
            backbone,
            split.images(),
            batch_size=cfg.batch_size,
            description=f"{export['model']} {name}",
            num_images=len(split),
            n_last_blocks=min(LINEAR_PROBE_BLOCKS, depth),
            device=device,
            transform=transform,
            progress=show_progress,
        ),
        train,
        test,
    )
    return score_features(
        export["model"], int(export["parameters"]), features, train, test, cfg, device=device, seconds=seconds
    )


def evaluate_raw_pixels(
    train: LabelledImages,
    test: LabelledImages,
    cfg: EvaluateConfig,
    *,
    device: torch.device,
    show_progress: bool,
) -> ModelResult:
    """The same protocol on the pixels every backbone receives (same resize, crop and normalisation),
    flattened: a learned feature that scores below this represents the data worse than its input."""
    transform = eval_transform(cfg.resize_size, cfg.crop_size)
    features, seconds = timed_split_features(
        lambda name, split: raw_pixel_features(
            split.images(),
            transform=transform,
            progress=show_progress,
            description=f"{RAW_PIXELS_MODEL} {name}",
            num_images=len(split),
        ),
        train,
        test,
    )
    return score_features(RAW_PIXELS_MODEL, 0, features, train, test, cfg, device=device, seconds=seconds)


def score_features(
    model: str,
    parameters: int,
    features: Mapping[str, FeatureSet],
    train: LabelledImages,
    test: LabelledImages,
    cfg: EvaluateConfig,
    *,
    device: torch.device,
    seconds: float,
) -> ModelResult:
    """k-NN for every k and (if configured) the linear probe on one model's train/test features."""
    timings = {"features": seconds}
    started = time.perf_counter()
    knn_top1 = knn_accuracy(
        features["train"].cls_ND,
        train.labels_N,
        features["test"].cls_ND,
        test.labels_N,
        ks=cfg.knn_ks,
        temperature=cfg.knn_temperature,
        num_classes=len(train.class_names),
        device=device,
    )
    timings["knn"] = time.perf_counter() - started
    probe = None
    if cfg.linear_probe:
        started = time.perf_counter()
        probe = linear_probe(
            features["train"],
            train.labels_N,
            features["test"],
            test.labels_N,
            lrs=cfg.linear_lrs,
            feature_sets=probe_feature_sets(features["train"]),
            epochs=cfg.linear_epochs,
            batch_size=cfg.linear_batch_size,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
            device=device,
        )
        timings["linear"] = time.perf_counter() - started
    return ModelResult(
        model=model,
        parameters=parameters,
        knn_top1=knn_top1,
        probe=probe,
        seconds={part: round(value, SECONDS_DIGITS) for part, value in timings.items()},
    )


def model_stats(result: ModelResult, reported_k: int) -> dict[str, Any]:
    return {
        "parameters": result.parameters,
        f"knn_top1_k{reported_k}": result.knn_top1[reported_k],
        "linear_top1": None if result.probe is None else result.probe.test_accuracy,
        "linear_setting": None if result.probe is None else probe_setting(result.probe),
        "seconds": result.seconds,
    }


def run_evaluate(cfg: EvaluateConfig, inputs: Mapping[str, Manifest], ctx: StageContext) -> dict[str, Any]:
    exports = read_exports(inputs["exports"])
    if not exports:
        ctx.write_output("results", EVAL_RESULTS.empty_table())
        ctx.warn("the exports manifest is empty; nothing evaluated")
        return {"models": {}}
    models = [export["model"] for export in exports]
    if len(set(models)) != len(models):
        raise ValueError(f"evaluate: model names in the exports manifest must be unique, got {models}")
    data = load_eval_data(cfg)
    baseline = evaluate_raw_pixels(
        data.train, data.test, cfg, device=data.device, show_progress=ctx.show_progress
    )
    results = [
        evaluate_backbone(
            export, data.train, data.test, cfg, device=data.device, show_progress=ctx.show_progress
        )
        for export in exports
    ]
    results.append(baseline)
    rows = [row for result in results for row in result_rows(result, data.name)]
    ctx.write_output("results", EVAL_RESULTS.table_from_rows(rows))
    title = f"{data.name}: {len(data.train)} train / {len(data.test)} test images"
    ctx.write_artifact(RESULTS_TABLE_FILE, results_markdown(results, cfg.knn_ks, title).encode())
    ctx.write_artifact(RESULTS_CHART_FILE, results_chart_png(results, cfg.knn_ks, title))
    return evaluation_stats(cfg, data, results)


@dataclass(frozen=True, slots=True)
class EvalData:
    """Both splits of the configured dataset, its name in results, and the device to evaluate on."""

    train: LabelledImages
    test: LabelledImages
    name: str
    device: torch.device
    seconds: float  # to load both splits


def load_eval_data(cfg: EvaluateConfig) -> EvalData:
    started = time.perf_counter()
    train = load_eval_split(cfg.dataset, "train", cfg.seed)
    test = load_eval_split(cfg.dataset, "test", cfg.seed)
    seconds = round(time.perf_counter() - started, SECONDS_DIGITS)
    return EvalData(train, test, dataset_name(cfg.dataset), choose_device(), seconds)


def evaluation_stats(cfg: EvaluateConfig, data: EvalData, results: Sequence[ModelResult]) -> dict[str, Any]:
    """The stage stats of an evaluation: data, device, and per model its k-NN (reported k) and probe."""
    reported_k = REPORTED_K if REPORTED_K in cfg.knn_ks else cfg.knn_ks[0]
    return {
        "dataset": data.name,
        "train_images": len(data.train),
        "test_images": len(data.test),
        "device": data.device.type,
        "seconds_data": data.seconds,
        "models": {result.model: model_stats(result, reported_k) for result in results},
    }


EVALUATE = register_stage(
    StageSpec(
        name="evaluate",
        version=2,  # 2: the raw-pixel baseline is scored beside the models
        config_type=EvaluateConfig,
        fn=run_evaluate,
        inputs={"exports": EXPORTS},
        outputs={"results": EVAL_RESULTS},
        description="k-NN (cosine, T = 0.07) and linear probe on frozen features of each exported backbone",
        tables=accuracy_tables,
    )
)
