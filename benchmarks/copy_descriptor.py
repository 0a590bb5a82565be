"""Copy-descriptor throughput on CPU: the descriptor lvd trains (as the dedup stages load it, a TorchScript
file through the `torchscript` embedder) beside EfficientNet-Lite0 ImageNet features, the embedder it
replaced, on the same real images.

    python -m benchmarks.copy_descriptor [--images 256] [--repeats 2]

Both run the same trunk; the descriptor adds GeM pooling and a 512-d projection. Timed at 224 px (both
kinds' default) and, for the descriptor, at the demo's 112 px. Untrained weights: only time is measured.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import ImageOps

from curation.copydetect.model import build_descriptor_net, export_torchscript
from curation.copydetect.stage import SSCD_DIM, SSCD_GEM_P
from curation.demo.sources import list_tuxpaint_stamps
from curation.embedders import EmbedderConfig, build_embedder
from pipelines.images import load_rgb

DEFAULT_SIZE = 224
DEMO_SIZE = 112
TRAINABLE_BLOCKS = 4
BATCH = 32
IMAGE_SIDE = 256  # stamps scaled to a typical crawled thumbnail


def _images(count: int) -> list:
    stamps = list_tuxpaint_stamps()
    return [
        ImageOps.contain(load_rgb(stamps[index % len(stamps)].path.read_bytes()), (IMAGE_SIDE, IMAGE_SIDE))
        for index in range(count)
    ]


def _images_per_second(cfg: EmbedderConfig, images: list, repeats: int) -> float:
    embedder = build_embedder(cfg)
    embedder.embed_images(images[:BATCH])  # warm-up
    best = min(_timed(embedder, images) for _ in range(repeats))
    return len(images) / best


def _timed(embedder: Any, images: list) -> float:
    started = time.perf_counter()
    embedder.embed_images(images)
    return time.perf_counter() - started


def measure(images: int = 256, repeats: int = 2) -> dict[str, Any]:
    pictures = _images(images)
    with tempfile.TemporaryDirectory() as folder:
        net = build_descriptor_net("efficientnet_lite0", TRAINABLE_BLOCKS, SSCD_DIM, SSCD_GEM_P)
        figures = {}
        for size in (DEFAULT_SIZE, DEMO_SIZE):
            path = export_torchscript(net, size, Path(folder) / f"descriptor_{size}.pt")
            descriptor = EmbedderConfig(kind="torchscript", path=str(path), image_size=size, batch_size=BATCH)
            figures[f"descriptor_{size}"] = _images_per_second(descriptor, pictures, repeats)
    features = EmbedderConfig(kind="efficientnet_lite0", image_size=DEFAULT_SIZE, batch_size=BATCH)
    figures["features_224"] = _images_per_second(features, pictures, repeats)
    return {
        "images": images,
        **{name: round(value, 1) for name, value in figures.items()},
        "ratio_224": round(figures[f"descriptor_{DEFAULT_SIZE}"] / figures["features_224"], 3),
        "ratio_demo": round(figures[f"descriptor_{DEMO_SIZE}"] / figures["features_224"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(measure(args.images, args.repeats))


if __name__ == "__main__":
    main()
