"""Multi-crop training data throughput: lvd's loader vs the official pipeline's style, side by side.

    python -m benchmarks.data_pipeline [--batches N] [--repeats N] [--synthetic]

Both read and decode the same manifest rows, draw 2 x 224 + 8 x 98 crops per image (ViT-S/14 settings)
with the same recipe and effective blur probabilities, and collate batches of 8 with the same
`collate_crops_and_masks`. "official style" composes torchvision v1 PIL transforms per crop
(RandomResizedCrop, flip, ColorJitter, grayscale, GaussianBlur, solarize, ToTensor, Normalize) as the
released code does; "lvd" is `make_train_loader`. Images: the demo's decodable images (build/demo-data),
else 256 x 256 RGB images made from the tuxpaint stamps. The first batch (worker start-up) is not timed;
the best of --repeats runs is shown. One torch thread per process, as DataLoader workers have.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision import transforms as v1
from torchvision.transforms import InterpolationMode

from curation.ingest import IngestConfig
from pipelines.images import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DecodeLimits,
    ProbedImage,
    iter_folder_files,
    list_folder_images,
    probe_image,
)
from pipelines.manifest import IMAGES
from training.config import CropsConfig, PretrainConfig, StudentConfig, TrainConfig
from training.data import augment
from training.data.collate import collate_crops_and_masks
from training.data.dataset import CuratedImages, make_train_loader
from training.data.masking import MaskingGenerator, official_max_num_patches

DEMO_DATA = Path("build/demo-data")
TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")
SYNTHETIC_SIDE = 256
SYNTHETIC_COUNT = 64
BATCH_SIZE = 8
WORKER_COUNTS = (0, 2)
DEFAULT_BATCHES = 16
DEFAULT_REPEATS = 2
PATCH_SIZE = 14
CROPS = CropsConfig(global_crops_size=224, local_crops_size=98, local_crops_number=8, blur="official")
CONFIG = PretrainConfig(
    student=StudentConfig(arch="vit_small", patch_size=PATCH_SIZE),
    crops=CROPS,
    train=TrainConfig(batch_size_per_gpu=BATCH_SIZE),
)


def image_table(folder: Path) -> pa.Table:
    """An `images` manifest of the decodable image files under `folder` (the ingest stage's limits)."""
    defaults = IngestConfig()
    limits = DecodeLimits(max_pixels=defaults.max_pixels, min_side=defaults.min_side)
    rows = []
    for item in iter_folder_files(list_folder_images(folder, IMAGE_EXTENSIONS)[0]):
        probed = None if item.data is None else probe_image(item.data, limits)
        if isinstance(probed, ProbedImage):
            rows.append(_row(item.uri, item.data, probed))
    return IMAGES.table_from_rows(rows)


def _row(uri: str, data: bytes, probed: ProbedImage) -> dict:
    return {
        "image_id": hashlib.sha256(data).hexdigest(),
        "source": "benchmark",
        "role": "curated",
        "uri": uri,
        "container": "file",
        "byte_offset": None,
        "byte_size": len(data),
        "width": probed.width,
        "height": probed.height,
        "format": probed.format,
        "mode": probed.mode,
        "num_frames": probed.num_frames,
    }


def synthesise_images(folder: Path) -> None:
    """256 x 256 RGB PNGs: tuxpaint stamps composited on white and resized."""
    stamps = sorted(TUXPAINT_STAMPS.rglob("*.png"))[:SYNTHETIC_COUNT]
    for index, stamp in enumerate(stamps):
        with Image.open(stamp) as img:
            rgba = img.convert("RGBA").resize((SYNTHETIC_SIDE, SYNTHETIC_SIDE), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        canvas.save(folder / f"{index:04d}.png")


def official_style_crop(
    size: int, scale: tuple[float, ...], blur_probability: float, solarize: bool
) -> v1.Compose:
    steps = [
        v1.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC),
        v1.RandomHorizontalFlip(augment.FLIP_PROBABILITY),
        v1.RandomApply(
            [
                v1.ColorJitter(
                    augment.JITTER_BRIGHTNESS,
                    augment.JITTER_CONTRAST,
                    augment.JITTER_SATURATION,
                    augment.JITTER_HUE,
                )
            ],
            p=augment.JITTER_PROBABILITY,
        ),
        v1.RandomGrayscale(augment.GRAYSCALE_PROBABILITY),
        v1.RandomApply(
            [v1.GaussianBlur(augment.BLUR_KERNEL_SIZE, sigma=augment.BLUR_SIGMA_RANGE)], p=blur_probability
        ),
    ]
    if solarize:
        steps.append(v1.RandomSolarize(augment.SOLARIZE_THRESHOLD, p=augment.SOLARIZE_PROBABILITY))
    steps += [v1.ToTensor(), v1.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v1.Compose(steps)


class OfficialStyleSamples(Dataset):
    """Row index -> the crops of that image through per-crop torchvision v1 pipelines."""

    def __init__(self, table: pa.Table) -> None:
        blur = augment.BLUR_PROBABILITIES[CROPS.blur]
        self.images = CuratedImages(table)
        self.global_1 = official_style_crop(
            CROPS.global_crops_size, CROPS.global_crops_scale, blur.global_1, False
        )
        self.global_2 = official_style_crop(
            CROPS.global_crops_size, CROPS.global_crops_scale, blur.global_2, True
        )
        self.local = official_style_crop(CROPS.local_crops_size, CROPS.local_crops_scale, blur.local, False)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = self.images[index]
        return {
            "global_crops": [self.global_1(image), self.global_2(image)],
            "local_crops": [self.local(image) for _ in range(CROPS.local_crops_number)],
        }


def official_style_loader(table: pa.Table, num_workers: int, num_batches: int) -> Iterator[dict]:
    grid = CROPS.global_crops_size // PATCH_SIZE
    rng = random.Random(0)
    collate = partial(
        collate_crops_and_masks,
        mask_ratio_min_max=CONFIG.ibot.mask_ratio_min_max,
        mask_probability=CONFIG.ibot.mask_sample_probability,
        n_tokens=grid * grid,
        mask_generator=MaskingGenerator(
            (grid, grid), official_max_num_patches(CROPS.global_crops_size, PATCH_SIZE), rng=rng
        ),
        rng=rng,
    )
    samples = OfficialStyleSamples(table)
    sampler = RandomSampler(samples, replacement=True, num_samples=num_batches * BATCH_SIZE)
    loader = DataLoader(
        samples,
        batch_size=BATCH_SIZE,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=True,
    )
    return iter(loader)


def images_per_second(batches: Iterator[dict], num_batches: int) -> float:
    next(batches)  # worker start-up and the first decode are not steady-state throughput
    started = time.perf_counter()
    timed = sum(1 for _ in islice(batches, num_batches - 1))
    return timed * BATCH_SIZE / (time.perf_counter() - started)


def measure(
    batches: int = DEFAULT_BATCHES, repeats: int = DEFAULT_REPEATS, synthetic: bool = False
) -> dict[str, Any]:
    """Images/s of the official-style and the lvd loader for each worker count (best of `repeats`)."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        if DEMO_DATA.is_dir() and not synthetic:
            source = f"demo images under {DEMO_DATA}"
            table = image_table(DEMO_DATA)
        else:
            source = f"{SYNTHETIC_SIDE}x{SYNTHETIC_SIDE} images from {TUXPAINT_STAMPS}"
            synthesise_images(Path(scratch))
            table = image_table(Path(scratch))
        by_workers = []
        for num_workers in WORKER_COUNTS:
            official, ours = 0.0, 0.0
            for _ in range(repeats):  # alternated, so a busy spell on the machine hits both
                official_batches = official_style_loader(table, num_workers, batches)
                official = max(official, images_per_second(official_batches, batches))
                our_batches = make_train_loader(
                    table, CONFIG, rank=0, world_size=1, start_step=0, num_workers=num_workers
                )
                ours = max(ours, images_per_second(our_batches, batches))
            by_workers.append(
                {"num_workers": num_workers, "official": official, "lvd": ours, "ratio": ours / official}
            )
    return {"images": table.num_rows, "source": source, "batches": batches, "by_workers": by_workers}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--batches", type=int, default=DEFAULT_BATCHES, help="batches per run (the first is not timed)"
    )
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="best of N runs per pipeline")
    parser.add_argument(
        "--synthetic", action="store_true", help="use the 256 x 256 images even with demo data"
    )
    args = parser.parse_args()
    result = measure(args.batches, args.repeats, args.synthetic)
    print(
        f"{result['images']} {result['source']}; 2 x 224 + 8 x 98 crops, batch {BATCH_SIZE}, "
        f"{args.batches} batches"
    )
    for row in result["by_workers"]:
        print(
            f"num_workers {row['num_workers']}: official style {row['official']:6.1f} images/s   "
            f"lvd {row['lvd']:6.1f} images/s   ratio {row['ratio']:.2f}x"
        )


if __name__ == "__main__":
    main()
