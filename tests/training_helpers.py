"""Tiny training runs for tests: a CPU-sized PretrainConfig, distill and evaluate sections (real images
come from pipelines.datasets.write_fashion_mnist_pngs)."""

from __future__ import annotations

from typing import Any

from pipelines.config import build_config
from training.config import PretrainConfig

# A 2-block, 64-wide ViT on 28-px global / 14-px local crops with 7-px patches: 16 + 4 patches per crop.
TINY_PRETRAIN: dict[str, Any] = {
    "student": {"arch": "vit_test", "patch_size": 7, "drop_path_rate": 0.1},
    "dino": {"head_n_prototypes": 32, "head_hidden_dim": 32, "head_bottleneck_dim": 16},
    "ibot": {"head_n_prototypes": 32, "head_hidden_dim": 32, "head_bottleneck_dim": 16},
    "optim": {"epochs": 5, "warmup_epochs": 1, "base_lr": 0.05, "freeze_last_layer_epochs": 1},
    "teacher": {"warmup_teacher_temp_epochs": 2},
    "crops": {"global_crops_size": 28, "local_crops_size": 14, "local_crops_number": 2},
    "train": {
        "batch_size_per_gpu": 4,
        "official_epoch_length": 2,
        "num_workers": 0,
        "checkpoint_period": 3,
        "precision": "fp32",
        "device": "cpu",
    },
}


def tiny_pretrain_section(**sections: dict[str, Any]) -> dict[str, Any]:
    """TINY_PRETRAIN as plain config data, with some sections' keys replaced."""
    data = {name: dict(values) for name, values in TINY_PRETRAIN.items()}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def tiny_pretrain_config(**sections: dict[str, Any]) -> PretrainConfig:
    """TINY_PRETRAIN with some sections' keys replaced, e.g. train={"max_steps": 3}."""
    return build_config(PretrainConfig, tiny_pretrain_section(**sections), "pretrain")


def tiny_distill_section(max_steps: int) -> dict[str, Any]:
    """Distillation of a tiny student (same tiny arch, no stochastic depth) from the tiny teacher."""
    recipe = tiny_pretrain_section(student={"drop_path_rate": 0.0}, train={"max_steps": max_steps})
    return {"recipe": recipe}


# k-NN and a short linear probe on a small class-balanced Fashion-MNIST subset at the tiny crop size.
TINY_EVALUATE: dict[str, Any] = {
    "dataset": {"kind": "fashion_mnist", "train_limit": 100, "test_limit": 50},
    "resize_size": 28,
    "crop_size": 28,
    "knn_ks": [10, 20],
    "linear_lrs": [0.01, 0.1],
    "linear_epochs": 2,
}


def tiny_training_sections(max_steps: int) -> dict[str, Any]:
    """pretrain, distill and evaluate sections for a whole-DAG test, as plain config data."""
    return {
        "pretrain": tiny_pretrain_section(train={"max_steps": max_steps}),
        "distill": tiny_distill_section(max_steps),
        "evaluate": TINY_EVALUATE,
    }
