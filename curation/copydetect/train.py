"""Self-supervised training of the copy descriptor on the user's own pool, SSCD's recipe at small scale.

    pool images (a seeded sample, as thumbnails) --two `training_view`s each--> [2b, 3, S, S]
      --`mix_batch`: some views mixed-up or cut-mixed with another image's view (both are then sources)-->
      --`CopyDescriptorNet`--> unit descriptors --`copy_loss` (InfoNCE + entropy)--> AdamW step
    (learning rate: linear warm-up, then cosine to zero)

The other images of the batch are the negatives. Everything random comes from the config's seed.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from curation.copydetect.augment import training_view
from curation.copydetect.loss import copy_loss
from curation.copydetect.model import CopyDescriptorNet
from pipelines.validation import require

# SSCD: mix-up and cut-mix half each, the mixing weight from Beta(2, 2).
MIX_BETA = 2.0
# Thumbnails keep training memory per image bounded, whatever the pool's image sizes.
THUMBNAIL_PER_IMAGE_SIZE = 2
HISTORY_EVERY_STEPS = 10


@dataclass(frozen=True, kw_only=True, slots=True)
class DescriptorTrainConfig:
    """SSCD's loss and augmentations; the schedule sized for fine-tuning a pretrained trunk."""

    steps: int = 2000
    batch_size: int = 64
    """Images per step, two views each: the other images of the batch are each view's negatives."""
    learning_rate: float = 5e-4
    weight_decay: float = 1e-6  # SSCD's
    warmup_fraction: float = 0.1
    temperature: float = 0.05  # SSCD's InfoNCE temperature
    entropy_weight: float = 10.0
    """SSCD's KoLeo weight: 30 in the paper, ~10 advised for a new trunk or setup (unstable above 40)."""
    mix_probability: float = 0.05  # per view, SSCD's mix-up + cut-mix rate
    max_images: int = 8192
    """Pool images sampled to train on (held in memory as thumbnails)."""
    seed: int = 0
    threads: int | None = None
    """CPU threads for training; unset: one per core of the machine, whatever OMP_NUM_THREADS says. Why
    fixed: CPU kernels split their sums by thread, so the weights (and every key after them) depend on it."""

    def __post_init__(self) -> None:
        require(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        require(
            self.batch_size >= 2,
            f"batch_size must be >= 2 (the other images are negatives), got {self.batch_size}",
        )
        require(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        require(
            0 <= self.warmup_fraction < 1, f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}"
        )
        require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        require(self.entropy_weight >= 0, f"entropy_weight must be >= 0, got {self.entropy_weight}")
        require(
            0 <= self.mix_probability <= 1, f"mix_probability must be in [0, 1], got {self.mix_probability}"
        )
        require(self.max_images >= 2, f"max_images must be >= 2, got {self.max_images}")
        require(self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}")


@dataclass(frozen=True, slots=True)
class TrainingStep:
    step: int
    loss: float
    infonce: float
    positive_similarity: float
    hardest_negative_similarity: float


def thumbnail(img: Image.Image, image_size: int) -> Image.Image:
    """`img` with its longer side at most THUMBNAIL_PER_IMAGE_SIZE * image_size (small ones unchanged)."""
    limit = THUMBNAIL_PER_IMAGE_SIZE * image_size
    if max(img.size) > limit:
        img = img.copy()
        img.thumbnail((limit, limit), Image.Resampling.BILINEAR)
    return img


def mix_batch(
    views: torch.Tensor, sources: torch.Tensor, probability: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixes some views with the view at the mirrored position of the batch (SSCD pairs with the
    reversed batch): half mix-up, half cut-mix. A mixed view shows both images: both are its sources."""
    mixed, mixed_sources = views.clone(), sources.clone()  # partners are always read unmixed
    count = len(views)
    size = views.shape[-1]
    for position in np.flatnonzero(rng.random(count) < probability):
        partner = count - 1 - position
        if torch.equal(sources[position] > 0, sources[partner] > 0):
            continue  # the middle view of an odd batch, or a view of the same image
        weight = float(rng.beta(MIX_BETA, MIX_BETA))
        if rng.random() < 0.5:
            mixed[position] = weight * views[position] + (1 - weight) * views[partner]
        else:  # paste a box covering (1 - weight) of the area from the partner
            side = round(size * math.sqrt(1 - weight))
            top, left = (int(rng.integers(0, size - side + 1)) for _ in range(2))
            mixed[position, :, top : top + side, left : left + side] = views[
                partner, :, top : top + side, left : left + side
            ]
        mixed_sources[position] = sources[position] + sources[partner]
    return mixed, mixed_sources


def learning_rate_at(step: int, cfg: DescriptorTrainConfig) -> float:
    warmup = max(1, round(cfg.warmup_fraction * cfg.steps))
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def train_descriptor(
    net: CopyDescriptorNet,
    images: Sequence[Image.Image],
    image_size: int,
    cfg: DescriptorTrainConfig,
    show_progress: bool = True,
) -> list[TrainingStep]:
    """Trains `net` in place on `images` (RGB); returns the loss history every HISTORY_EVERY_STEPS steps."""
    require(len(images) >= 2, f"training a copy descriptor needs at least 2 images, got {len(images)}")
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    try:
        return _train(net, images, image_size, cfg, show_progress)
    finally:
        torch.set_num_threads(previous)


def _train(
    net: CopyDescriptorNet,
    images: Sequence[Image.Image],
    image_size: int,
    cfg: DescriptorTrainConfig,
    show_progress: bool,
) -> list[TrainingStep]:
    rng = np.random.default_rng(cfg.seed)
    batch_size = min(cfg.batch_size, len(images))
    trainable = [parameter for parameter in net.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    net.train()
    history: list[TrainingStep] = []
    order = rng.permutation(len(images))
    cursor = 0
    started = time.perf_counter()
    progress = tqdm(range(cfg.steps), desc="copy_descriptor", unit="step", disable=not show_progress)
    for step in progress:
        if cursor + batch_size > len(order):  # a new epoch: a new order
            order, cursor = rng.permutation(len(images)), 0
        batch = order[cursor : cursor + batch_size]
        cursor += batch_size
        views = torch.stack(
            [training_view(images[index], rng, image_size) for index in batch for _ in range(2)]
        )
        identity = torch.eye(batch_size).repeat_interleave(2, dim=0)
        views, sources = mix_batch(views, identity, cfg.mix_probability, rng)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, cfg)
        loss = copy_loss(net(views), sources, cfg.temperature, cfg.entropy_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        optimizer.step()
        total = float(loss.total.detach())
        if not math.isfinite(total):
            raise FloatingPointError(
                f"copy descriptor loss is {total} at step {step}: lower entropy_weight "
                f"({cfg.entropy_weight}) or learning_rate ({cfg.learning_rate})"
            )
        if step % HISTORY_EVERY_STEPS == 0 or step == cfg.steps - 1:
            history.append(
                TrainingStep(
                    step,
                    round(total, 4),
                    round(float(loss.infonce.detach()), 4),
                    round(loss.positive_similarity, 4),
                    round(loss.hardest_negative_similarity, 4),
                )
            )
            progress.set_postfix(loss=f"{total:.3f}", s=f"{time.perf_counter() - started:.0f}")
    net.eval()
    return history
