"""Per-image costs on this machine, the inputs of docs/scale.md: decode, hash, embed, and model FLOPs.

    nice python -m benchmarks.per_image_costs [--threads 1] [--repeats 20]

One web-sized test image (a tuxpaint stamp on a noisy background, WEB_WIDTH x WEB_HEIGHT, JPEG quality
JPEG_QUALITY) goes through what each stage does to an image, timed per CPU thread (best of --repeats):
  ingest   probe_image: header checks and one full decode
  phash    load_rgb + hash_image("phash") (imagededup's PHash, as phash_dedup runs it)
  embed    the square 224 px preprocessing plus one forward at batch EMBED_BATCH, for EfficientNet-Lite0
           (the demo's embedder) and lvd's ViT-S/14 (untrained weights: only time is measured)
FLOPs per image (torch FlopCounterMode on meta tensors, one multiply-add = 2 FLOPs) of the models the
paper runs, to scale the CPU costs to GPUs: ViT-H/16 at 224 (retrieval embedding), ResNet-50 at 288
(SSCD copy detection), and one training image (2 x 224 + 8 x 98 crops: student forward and backward on
the kept share of stochastic depth, teacher forward on the global crops; heads left out, about 2% more)
for ViT-S/14 (to check against benchmarks/train_step.py's CPU time) and ViT-g/14 (the paper's model).
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from curation.dedup.hamming import hash_image
from curation.embedders import EmbedderConfig
from curation.embedders.registry import build_embedder
from curation.ingest import IngestConfig
from pipelines.images import DecodeLimits, load_rgb, probe_image
from training.models.vit import build_vit

TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")
WEB_WIDTH, WEB_HEIGHT = 640, 480  # a typical crawled photo is a few hundred pixels a side
JPEG_QUALITY = 90
BACKGROUND_NOISE = 40  # grey-level spread: photo-like entropy, so the JPEG decodes like one
EMBED_BATCH = 32
GLOBAL_CROP, LOCAL_CROP, LOCAL_CROPS = 224, 98, 8
SSCD_SIZE = 288  # SSCD's ResNet-50 at a short side of 288 px
VITG_DROP_PATH = 0.4  # ViT-g/14's stochastic-depth rate in the paper's recipe
VITS_DROP_PATH = 0.3  # the rate benchmarks/train_step.py times ViT-S/14 at
BACKWARD_PER_FORWARD = 2  # a backward pass costs about two forwards
GIGA = 1e9
SEED = 0


def web_jpeg() -> bytes:
    rng = np.random.default_rng(SEED)
    noise = rng.normal(128, BACKGROUND_NOISE, (WEB_HEIGHT, WEB_WIDTH, 3)).clip(0, 255).astype(np.uint8)
    canvas = Image.fromarray(noise)
    stamp_path = sorted(TUXPAINT_STAMPS.rglob("*.png"))[0]
    with Image.open(stamp_path) as stamp:
        rgba = stamp.convert("RGBA").resize((WEB_HEIGHT, WEB_HEIGHT))
    canvas.paste(rgba, ((WEB_WIDTH - WEB_HEIGHT) // 2, 0), mask=rgba.getchannel("A"))
    buffer = io.BytesIO()
    canvas.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def best_seconds(work: Callable[[], object], repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        timings.append(time.perf_counter() - started)
    return min(timings)


def embed_seconds_per_image(cfg: EmbedderConfig, image: Image.Image, repeats: int) -> float:
    embedder = build_embedder(cfg)
    batch = [image] * EMBED_BATCH
    embedder.embed_images(batch)  # warm-up: first calls allocate
    return best_seconds(lambda: embedder.embed_images(batch), max(1, repeats // 4)) / EMBED_BATCH


def vit_seconds_per_image(image: Image.Image, repeats: int) -> float:
    model = build_vit("vit_small", patch_size=14).eval()
    crop = torchvision.transforms.functional.to_tensor(image.resize((GLOBAL_CROP, GLOBAL_CROP)))
    batch = crop.unsqueeze(0).repeat(EMBED_BATCH, 1, 1, 1)
    with torch.inference_mode():
        model(batch)
        return best_seconds(lambda: model(batch), max(1, repeats // 4)) / EMBED_BATCH


def forward_gflops(build: Callable[[], torch.nn.Module], side: int) -> float:
    """Forward FLOPs (GFLOP) of one image of `side` x `side` pixels, counted on meta tensors."""
    with torch.device("meta"):
        model = build().eval()
        image = torch.empty(1, 3, side, side)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(image)
    return counter.get_total_flops() / GIGA


def train_step_gflops(arch: str, drop_path_rate: float) -> float:
    """One image's training FLOPs: the student's forward and backward over 2 global + 8 local crops, on
    the kept share of stochastic depth (lvd computes the branches of kept samples only), plus the teacher's
    forward over the 2 global crops."""
    global_crop = forward_gflops(lambda: build_vit(arch, patch_size=14), GLOBAL_CROP)
    local_crop = forward_gflops(lambda: build_vit(arch, patch_size=14), LOCAL_CROP)
    student = 2 * global_crop + LOCAL_CROPS * local_crop
    return (1 + BACKWARD_PER_FORWARD) * (1 - drop_path_rate) * student + 2 * global_crop


def efficientnet_gflops() -> float:
    """EfficientNet-Lite0 at 224 px: counted on the real (small) model, whose loader needs real tensors."""
    embedder = build_embedder(EmbedderConfig(kind="efficientnet_lite0"))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        embedder.features(torch.zeros(1, 3, GLOBAL_CROP, GLOBAL_CROP))
    return counter.get_total_flops() / GIGA


def measure(threads: int = 1, repeats: int = 20) -> dict[str, Any]:
    """Seconds per image per stage on `threads` CPU threads, and GFLOPs per image of the paper's models."""
    torch.set_num_threads(threads)
    data = web_jpeg()
    defaults = IngestConfig()
    limits = DecodeLimits(max_pixels=defaults.max_pixels, min_side=defaults.min_side)
    image = load_rgb(data)
    return {
        "threads": threads,
        "jpeg_bytes": len(data),
        "seconds": {
            "ingest_probe": best_seconds(lambda: probe_image(data, limits), repeats),
            "phash": best_seconds(lambda: hash_image("phash", load_rgb(data)), repeats),
            "embed_efficientnet_lite0": embed_seconds_per_image(
                EmbedderConfig(kind="efficientnet_lite0"), image, repeats
            ),
            "embed_vit_s14": vit_seconds_per_image(image, repeats),
        },
        "gflops": {
            "efficientnet_lite0_224": efficientnet_gflops(),
            "vit_s14_224": forward_gflops(lambda: build_vit("vit_small", patch_size=14), GLOBAL_CROP),
            "vit_h16_224": forward_gflops(lambda: build_vit("vit_huge", patch_size=16), GLOBAL_CROP),
            "resnet50_288": forward_gflops(lambda: torchvision.models.resnet50(weights=None), SSCD_SIZE),
            "vit_g14_224": forward_gflops(lambda: build_vit("vit_giant2", patch_size=14), GLOBAL_CROP),
            "vit_s14_train_step": train_step_gflops("vit_small", VITS_DROP_PATH),
            "vit_g14_train_step": train_step_gflops("vit_giant2", VITG_DROP_PATH),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    result = measure(args.threads, args.repeats)
    print(
        f"{WEB_WIDTH} x {WEB_HEIGHT} JPEG ({result['jpeg_bytes']:,} bytes), {result['threads']} CPU thread(s)"
    )
    for name, seconds in result["seconds"].items():
        print(f"  {name:<26} {seconds * 1e3:9.2f} ms/image  {1 / seconds:9.1f} images/s")
    for name, gflops in result["gflops"].items():
        print(f"  {name:<26} {gflops:9.1f} GFLOP/image")


if __name__ == "__main__":
    main()
