"""Deterministic, resumable multi-crop batches over a curated manifest.

    step s, rank r --positions (s*W + r)*B .. +B-1--> position p --image perm_e[p mod n], e = p // n-->
      manifest row --load_row_rgb--> PIL --MultiCropAugmentation seeded by (seed, p)--> crops
      --collate, masks drawn from random.Random(seed, s, r)--> batch of (step s, rank r)

Every random choice is seeded from the run seed and a position or (step, rank), never from worker state,
so the batch of (step, rank) is a pure function of (seed, step, rank, W, B, the manifest's rows): the same
with any `num_workers`, and the same whether a run started at step 0 or resumed at step k. Rows are put in
(image_id, uri) order first: image_id hashes the bytes, so neither how upstream stages laid out their parts
nor where the images live changes what a step sees. Each pass over the manifest is a fresh permutation,
and a global batch is split across ranks, so every image is seen once per pass whatever W is.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Iterator, Sequence

import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipelines.images import load_row_rgb
from pipelines.manifest import sort_rows
from pipelines.validation import require
from training.config import PretrainConfig
from training.data.augment import MultiCropAugmentation
from training.data.collate import collate_crops_and_masks
from training.data.masking import MaskingGenerator, official_max_num_patches

SEED_BITS = 63
# Separate streams so the order, augmentation and mask draws never share a seed.
ORDER_STREAM = "order"
AUGMENT_STREAM = "augment"
MASK_STREAM = "mask"
LOADER_STREAM = "loader"
WORKER_START_METHOD = "forkserver"
# A batch may straddle two passes; keeping both permutations avoids redrawing one per sample.
CACHED_PASSES = 2


class ImageLoadError(RuntimeError):
    """A manifest row whose image could not be read or decoded."""


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of parts; different tuples give unrelated seeds."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - SEED_BITS)


class CuratedImages:
    """Rows of an `images`/`curated` manifest as RGB PIL images."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int) -> Image.Image:
        row = self.table.slice(index, 1).to_pylist()[0]
        try:
            return load_row_rgb(row)
        except (OSError, ValueError) as err:
            raise ImageLoadError(f"manifest row {index} ({row['uri']}): {err}") from err


@functools.lru_cache(maxsize=CACHED_PASSES)
def pass_permutation(num_images: int, seed: int, pass_index: int) -> torch.Tensor:
    """The image order of pass `pass_index`: a permutation of range(num_images), new for every pass."""
    generator = torch.Generator().manual_seed(derive_seed(seed, ORDER_STREAM, pass_index))
    return torch.randperm(num_images, generator=generator)


def image_index(position: int, num_images: int, seed: int) -> int:
    """The manifest row shown at global sample position `position` (0, 1, 2, ... over the whole run)."""
    pass_index, offset = divmod(position, num_images)
    return int(pass_permutation(num_images, seed, pass_index)[offset])


def step_positions(step: int, rank: int, world_size: int, batch_size: int) -> range:
    """The positions rank `rank` holds at `step`: its slice of the step's global batch of W * B."""
    first = (step * world_size + rank) * batch_size
    return range(first, first + batch_size)


class StepBatchSampler:
    """Yields the positions of steps start_step, start_step + 1, ... for one rank, forever."""

    def __init__(self, *, start_step: int, rank: int, world_size: int, batch_size: int) -> None:
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield list(step_positions(step, self.rank, self.world_size, self.batch_size))
            step += 1


class MultiCropSamples(Dataset):
    """Map-style dataset over positions: position p -> the augmented crops of its image, seeded by p."""

    def __init__(self, images: CuratedImages, augmentation: MultiCropAugmentation, seed: int) -> None:
        self.images = images
        self.augmentation = augmentation
        self.seed = seed

    def __getitem__(self, position: int) -> dict:
        image = self.images[image_index(position, len(self.images), self.seed)]
        # Why fork_rng: torchvision v2 draws from torch's global CPU generator; seeding it per sample makes
        # the crops independent of worker count and order, and restoring it leaves the caller's stream alone.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derive_seed(self.seed, AUGMENT_STREAM, position))
            crops = self.augmentation(image)
        return {**crops, "position": position}


class StepCollate:
    """collate_fn: draws the masks of (step, rank) from their own seed, then collates the batch."""

    def __init__(self, cfg: PretrainConfig, *, rank: int, world_size: int) -> None:
        crops = cfg.crops
        patch_size = cfg.student.patch_size
        grid = crops.global_crops_size // patch_size
        self.grid = (grid, grid)
        self.n_tokens = grid * grid
        self.max_num_patches = official_max_num_patches(crops.global_crops_size, patch_size)
        self.local_crops_size = crops.local_crops_size
        self.mask_ratio_min_max = cfg.ibot.mask_ratio_min_max
        self.mask_probability = cfg.ibot.mask_sample_probability
        self.seed = cfg.train.seed
        self.rank = rank
        self.global_batch_size = world_size * cfg.train.batch_size_per_gpu

    def __call__(self, samples: Sequence[dict]) -> dict:
        step = samples[0]["position"] // self.global_batch_size
        rng = random.Random(derive_seed(self.seed, MASK_STREAM, step, self.rank))
        return collate_crops_and_masks(
            samples,
            mask_ratio_min_max=self.mask_ratio_min_max,
            mask_probability=self.mask_probability,
            n_tokens=self.n_tokens,
            mask_generator=MaskingGenerator(self.grid, self.max_num_patches, rng=rng),
            rng=rng,
            dtype=torch.float32,
            local_crops_size=self.local_crops_size,
        )


def make_train_loader(
    table: pa.Table, cfg: PretrainConfig, *, rank: int, world_size: int, start_step: int, num_workers: int
) -> Iterator[dict]:
    """Collated batches of this rank for steps start_step, start_step + 1, ... (forever)."""
    require(table.num_rows >= 1, "the training manifest has no rows")
    require(0 <= rank < world_size, f"rank {rank} is not in [0, {world_size})")
    require(start_step >= 0, f"start_step must be >= 0, got {start_step}")
    # Why: manifest row order follows part names, which hash keys that include each image's path.
    table = sort_rows(table)
    samples = MultiCropSamples(CuratedImages(table), MultiCropAugmentation(cfg.crops), cfg.train.seed)
    sampler = StepBatchSampler(
        start_step=start_step, rank=rank, world_size=world_size, batch_size=cfg.train.batch_size_per_gpu
    )
    loader = DataLoader(
        samples,
        batch_sampler=sampler,
        collate_fn=StepCollate(cfg, rank=rank, world_size=world_size),
        num_workers=num_workers,
        # Why: a forked worker inherits the locks of every parent thread (Ray's gRPC client, Prefect's
        # event loop, OpenMP); forked while one is held, it can crash (seen: SIGSEGV in a worker of
        # `lvd ablate-data`). forkserver workers start from a clean, single-threaded server process.
        multiprocessing_context=WORKER_START_METHOD if num_workers > 0 else None,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        # Why: without a generator the DataLoader draws its worker base seed from the global torch stream.
        generator=torch.Generator().manual_seed(derive_seed(cfg.train.seed, LOADER_STREAM, rank)),
    )
    return iter(loader)
