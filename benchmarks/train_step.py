"""One DINOv2 training step, side by side: time per step, images/s and peak memory per variant.

    python -m benchmarks.train_step                     # CPU: ViT-S/14, batch 8 (2 x 224 + 8 x 98 crops)
    python -m benchmarks.train_step --device cuda --arch vit_small vit_large --batch 32 \\
        --variants sdpa xformers                         # the GPU check (benchmarks/gpu_check.sh)

Each variant runs in its own process (so peak RSS / peak CUDA memory is its own) through the real
training path: FSDP2 (a world of one), `train_step` (forward_backward, per-submodule clipping, AdamW,
EMA) on a real multi-crop batch with block masks; 65,536 prototypes, Sinkhorn-Knopp centering. Variants:
  lvd           packed crops, efficient stochastic depth (d = 0.3, the default config's rate)
  no-subset     the same step with drop_path_rate 0: what the sample-subsetting trick saves
  official      the official code's step on the same work, d = 0.3 (`benchmarks/official_step.py`;
                `make official-baseline` installs the official package into build/official-dinov2)
  official-dp0  the same at drop_path_rate 0
  sdpa          (CUDA) PyTorch SDPA per crop size       LVD_ATTENTION=sdpa
  xformers      (CUDA) one xFormers call, block-diagonal LVD_ATTENTION=xformers
Ratios are printed against the first variant, and lvd against the official step at the same rate.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.peak_memory import peak_rss_mib
from pipelines.config import build_config
from training.config import PretrainConfig
from training.data.augment import MultiCropAugmentation
from training.data.collate import collate_crops_and_masks
from training.data.masking import MaskingGenerator, official_max_num_patches
from training.optim import build_optimizer, build_schedules, param_groups
from training.parallel import init_distributed, shutdown
from training.trainer import build_model, loss_scaler, train_step

SOURCE_IMAGE_SIDE = 256
WARMUP_STEPS = 1
STEP_AFTER_WARMUP = 100  # schedules at a step past the lr warmup, so every update is non-zero
DEFAULT_DROP_PATH = 0.3  # ssl_default_config
KIB = 1024
DEFAULT_ARCHS = ("vit_small",)
DEFAULT_BATCH = 8
DEFAULT_STEPS = 3
DEFAULT_VARIANTS = ("lvd", "no-subset")
OFFICIAL_PAIRS = {"lvd": "official", "no-subset": "official-dp0"}  # lvd's step -> the same work, official
CENTERING = "sinkhorn_knopp"
REPO = Path(__file__).resolve().parents[1]
OFFICIAL_DIR = REPO / "build" / "official-dinov2"
OFFICIAL_STEP = REPO / "benchmarks" / "official_step.py"
VARIANTS = {
    "lvd": {"drop_path_rate": DEFAULT_DROP_PATH},
    "no-subset": {"drop_path_rate": 0.0},
    "official": {"drop_path_rate": DEFAULT_DROP_PATH, "official": True},
    "official-dp0": {"drop_path_rate": 0.0, "official": True},
    "sdpa": {"drop_path_rate": DEFAULT_DROP_PATH, "attention": "sdpa"},
    "xformers": {"drop_path_rate": DEFAULT_DROP_PATH, "attention": "xformers"},
}


def benchmark_config(arch: str, batch: int, drop_path_rate: float, device: str, precision: str):
    data = {
        "student": {"arch": arch, "patch_size": 14, "drop_path_rate": drop_path_rate},
        "crops": {"global_crops_size": 224, "local_crops_size": 98, "local_crops_number": 8},
        "train": {"batch_size_per_gpu": batch, "device": device, "precision": precision},
    }
    data["train"]["centering"] = CENTERING
    return build_config(PretrainConfig, data, "pretrain")


def synthetic_batch(cfg, seed: int) -> dict:
    """A real multi-crop batch (augmentation, block masks, collate) of random RGB images."""
    rng = np.random.default_rng(seed)
    augment = MultiCropAugmentation(cfg.crops)
    images = [
        Image.fromarray(rng.integers(0, 256, (SOURCE_IMAGE_SIDE, SOURCE_IMAGE_SIDE, 3), dtype=np.uint8))
        for _ in range(cfg.train.batch_size_per_gpu)
    ]
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    mask_rng = random.Random(seed)
    masking = MaskingGenerator(
        (grid, grid),
        official_max_num_patches(cfg.crops.global_crops_size, cfg.student.patch_size),
        rng=mask_rng,
    )
    return collate_crops_and_masks(
        [augment(image) for image in images],
        mask_ratio_min_max=cfg.ibot.mask_ratio_min_max,
        mask_probability=cfg.ibot.mask_sample_probability,
        n_tokens=grid * grid,
        mask_generator=masking,
        rng=mask_rng,
        local_crops_size=cfg.crops.local_crops_size,
    )


def measure_in_process(
    arch: str, batch: int, steps: int, device: str, precision: str, drop_path_rate: float
) -> dict:
    """Runs in the variant's own process; returns seconds per step, images/s and peak memory."""
    cfg = benchmark_config(arch, batch, drop_path_rate, device, precision)
    env = init_distributed(cfg.train.device)
    try:
        model = build_model(cfg, env)
        model.train()
        groups = param_groups(
            dict(model.student.items()),
            layerwise_decay=cfg.optim.layerwise_decay,
            patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult,
            num_blocks=len(model.student["backbone"].blocks),
        )
        optimizer = build_optimizer(groups, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))
        values = build_schedules(cfg, global_batch=batch).at(STEP_AFTER_WARMUP)
        scaler = loss_scaler(cfg, env)
        step_batch = synthetic_batch(cfg, seed=0)
        timings = []
        for index in range(WARMUP_STEPS + steps):
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            train_step(model, optimizer, step_batch, values, scaler, cfg.optim.clip_grad)
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            if index >= WARMUP_STEPS:
                timings.append(time.perf_counter() - started)
        seconds = float(np.median(timings))
        if env.device.type == "cuda":
            peak_mib = torch.cuda.max_memory_allocated() / KIB / KIB
        else:
            peak_mib = peak_rss_mib()
        return {"seconds_per_step": seconds, "images_per_s": batch / seconds, "peak_mib": peak_mib}
    finally:
        shutdown(env)


def run_variant(variant: str, arch: str, batch: int, steps: int, device: str, precision: str) -> dict:
    options = VARIANTS[variant]
    request = {"arch": arch, "batch": batch, "steps": steps, "drop_path_rate": options["drop_path_rate"]}
    if options.get("official"):
        if device != "cpu" or not OFFICIAL_DIR.is_dir():
            raise RuntimeError(f"the official step runs on CPU from {OFFICIAL_DIR}: `make official-baseline`")
        # Why a script path and PYTHONPATH of the official package only: that process imports no lvd.
        env = {**os.environ, "PYTHONPATH": str(OFFICIAL_DIR)}
        command = [sys.executable, str(OFFICIAL_STEP), json.dumps({**request, "centering": CENTERING})]
    else:
        env = {**os.environ, "LVD_ATTENTION": options.get("attention", "auto")}
        request |= {"device": device, "precision": precision}
        command = [sys.executable, "-m", "benchmarks.train_step", "--worker", json.dumps(request)]
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True, cwd=REPO).stdout
    return json.loads(output.strip().splitlines()[-1])


def measure(
    archs: Sequence[str] = DEFAULT_ARCHS,
    batch: int = DEFAULT_BATCH,
    steps: int = DEFAULT_STEPS,
    device: str = "cpu",
    precision: str = "bf16",
    variants: Sequence[str] = DEFAULT_VARIANTS,
    repeats: int = 1,
) -> dict[str, dict[str, dict]]:
    """arch -> variant -> seconds per step, images/s and peak MiB, each variant in its own process.

    With `repeats` > 1 the variants run in alternating order (forward, then backward, ...) and each
    keeps its fastest run: on a shared 2-core VM one run of the same step varies by a third, so a single
    side-by-side pair mostly measures which run a busy spell hit.
    """
    results: dict[str, dict[str, dict]] = {}
    for arch in archs:
        best: dict[str, dict] = {}
        for repeat in range(repeats):
            for variant in variants if repeat % 2 == 0 else reversed(variants):
                found = run_variant(variant, arch, batch, steps, device, precision)
                if variant not in best or found["seconds_per_step"] < best[variant]["seconds_per_step"]:
                    best[variant] = found
        results[arch] = {variant: best[variant] for variant in variants}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS))
    parser.add_argument(
        "--batch", type=int, default=DEFAULT_BATCH, help="images per step (each: 2 global + 8 local crops)"
    )
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help="timed steps after one warm-up step (median)"
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=sorted(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per variant (fastest kept)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure_in_process(**json.loads(args.worker))))
        return
    print(f"{args.device}, {args.precision} (CPU computes fp32), batch {args.batch}: 2 x 224 + 8 x 98 crops")
    header = ("arch", "variant", "s/step", "images/s", "peak MiB", "time ratio", "mem ratio")
    print("".join(f"{name:<11}" if index < 2 else f"{name:>11}" for index, name in enumerate(header)))
    results = measure(
        args.arch, args.batch, args.steps, args.device, args.precision, args.variants, args.repeats
    )
    for arch, by_variant in results.items():
        baseline = by_variant[args.variants[0]]
        for variant, result in by_variant.items():
            time_ratio = result["seconds_per_step"] / baseline["seconds_per_step"]
            memory_ratio = result["peak_mib"] / baseline["peak_mib"]
            print(
                f"{arch:<11}{variant:<11}{result['seconds_per_step']:>11.3f}{result['images_per_s']:>11.2f}"
                f"{result['peak_mib']:>11.0f}{time_ratio:>11.2f}{memory_ratio:>11.2f}"
            )
        for ours, theirs in OFFICIAL_PAIRS.items():
            if ours in by_variant and theirs in by_variant:
                mine, official = by_variant[ours], by_variant[theirs]
                time_ratio = mine["seconds_per_step"] / official["seconds_per_step"]
                memory_ratio = mine["peak_mib"] / official["peak_mib"]
                print(f"{arch}: {ours} vs {theirs}: time {time_ratio:.2f}, memory {memory_ratio:.2f}")


if __name__ == "__main__":
    main()
