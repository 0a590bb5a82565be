"""`DemoDataConfig`: how many images of each real source go where, validated when constructed."""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import numpy as np

from pipelines.datasets import FASHION_MNIST_CLASSES
from pipelines.images import DEFAULT_MIN_SIDE

FASHION_TRAIN_SIZE = 60_000
FASHION_TEST_SIZE = 10_000
FASHION_TRAIN_PER_CLASS = 6_000
# Clip art keeps its shorter side at twice the decoder's minimum, so a crop of it is still accepted.
CLIPART_MIN_SIDE = 2 * DEFAULT_MIN_SIDE


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoDataConfig:
    """How much of each real source goes where. Every count is a number of images written."""

    seed: int = 0
    """Seeds every random choice; two builds with the same config are byte-identical."""
    seed_fashion_classes: tuple[str, ...] = FASHION_MNIST_CLASSES
    """Fashion-MNIST classes that form the curated seed set: all ten, the domain the demo evaluates on,
    as the paper's seed sets are the curated datasets of its evaluation domains (labels never reach
    training; they only pick the seeds)."""
    seed_fashion_per_class: int = 12
    seed_tuxpaint_count: int = 60
    pool_fashion_count: int = 5400
    """Fashion-MNIST train images (all 10 classes, never a seed image) in the tar shards: about 540 a
    class, so that 16 nearest neighbours for each of a class's 12 seeds leave most of the class behind."""
    pool_clipart_count: int = 800
    """Open Clip Art images in the tar shards, members of byte-identical groups included."""
    clipart_duplicate_groups: int = 40
    """At most this many byte-identical clip-art groups are included whole (exact duplicates)."""
    clipart_max_side: int = 256
    """Clip art is downscaled so its longer side is at most this many pixels."""
    pool_near_copy_count: int = 150
    """Transformed copies of pool images, added to the tar shards."""
    eval_count: int = 1000
    """Fashion-MNIST test images in the eval set."""
    eval_near_copy_count: int = 40
    """Transformed copies of eval images hidden in the tar shards (contamination to find)."""
    shard_size: int = 500
    """Members per tar shard."""
    icon_name_count: int = 100
    """Adwaita icon names; each is written at every size it has."""
    icon_min_size: int = DEFAULT_MIN_SIDE
    web_fashion_count: int = 150
    """Fashion-MNIST train images in pool_web.parquet, disjoint from the seeds and the shards."""
    web_exact_copy_count: int = 50
    """Byte copies of tar-shard members in pool_web.parquet (duplicates across sources)."""
    web_row_group_size: int = 64

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{field.name} must be a non-negative integer, got {value!r}")
        for name in ("shard_size", "web_row_group_size"):
            require(getattr(self, name) >= 1, name, "must be at least 1")
        unknown = [name for name in self.seed_fashion_classes if name not in FASHION_MNIST_CLASSES]
        require(
            not unknown, "seed_fashion_classes", f"unknown classes {unknown}; known: {FASHION_MNIST_CLASSES}"
        )
        require(
            len(set(self.seed_fashion_classes)) == len(self.seed_fashion_classes),
            "seed_fashion_classes",
            "must not repeat a class",
        )
        require(
            self.seed_fashion_per_class <= FASHION_TRAIN_PER_CLASS,
            "seed_fashion_per_class",
            f"Fashion-MNIST has {FASHION_TRAIN_PER_CLASS} train images per class",
        )
        seeds = self.seed_fashion_per_class * len(self.seed_fashion_classes)
        require(
            seeds + self.pool_fashion_count + self.web_fashion_count <= FASHION_TRAIN_SIZE,
            "pool_fashion_count",
            f"seeds, shards and web together exceed {FASHION_TRAIN_SIZE} train images",
        )
        require(self.eval_count <= FASHION_TEST_SIZE, "eval_count", f"the test split has {FASHION_TEST_SIZE}")
        require(self.eval_near_copy_count <= self.eval_count, "eval_near_copy_count", "exceeds eval_count")
        require(
            self.clipart_max_side >= CLIPART_MIN_SIDE, "clipart_max_side", f"must be >= {CLIPART_MIN_SIDE}"
        )
        require(
            self.icon_min_size >= DEFAULT_MIN_SIDE,
            "icon_min_size",
            f"icons under {DEFAULT_MIN_SIDE} px would be rejected as too small",
        )
        shard_originals = self.pool_fashion_count + self.pool_clipart_count
        require(
            self.pool_near_copy_count == 0 or shard_originals > 0,
            "pool_near_copy_count",
            "needs pool_fashion_count or pool_clipart_count > 0 to copy from",
        )
        require(
            self.web_exact_copy_count <= shard_originals,
            "web_exact_copy_count",
            "exceeds the tar-shard images there are to copy",
        )


def require(condition: bool, field: str, message: str) -> None:
    """Raises ValueError("<field>: <message>") unless `condition` holds."""
    if not condition:
        raise ValueError(f"{field}: {message}")


def random_stream(seed: int, purpose: str) -> np.random.Generator:
    """An independent random stream per purpose, so changing one count does not reshuffle the rest."""
    return np.random.default_rng([seed, zlib.crc32(purpose.encode())])
