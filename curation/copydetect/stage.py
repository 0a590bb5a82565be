"""The `copy_descriptor` stage: the copy-detection model that `copy_dedup` and `decontaminate` use.

images (key ranges) --seeded sample of the rows of `roles` (only they are read), thumbnails-->
  `train.train_descriptor` (SSCD's recipe on the pool itself) --trace--> descriptor.torchscript.pt
  --> model (one row: the file, its weights' sha256, the `torchscript` embedder settings that load it)

or, with `pretrained` set (a downloaded SSCD file, or any embedder as a baseline), no training: the row
names that embedder. Either way the dedup stages build their embedder from the row, so a new descriptor
recomputes them, and only them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from curation.copydetect.model import (
    build_descriptor_net,
    check_trunk,
    export_torchscript,
    trunk_fingerprint,
    weights_sha256,
)
from curation.copydetect.train import DescriptorTrainConfig, thumbnail, train_descriptor
from curation.embedders import EmbedderConfig, weights_fingerprint
from pipelines.config import build_config
from pipelines.images import load_row_rgb
from pipelines.manifest import IMAGES, ManifestSchema, Role
from pipelines.partitions import KeyRanges, stage_key_ranges
from pipelines.stage import Manifest, StageContext, StageSpec, register_stage
from pipelines.store import location_from_manifest, location_in_manifest
from pipelines.validation import UserInputError, require

MODEL_FILE = "descriptor.torchscript.pt"
WEIGHTS_DIR = "weights"  # beside the outputs' folders, never inside one
TRAINED = "trained"
MIN_TRAINING_IMAGES = 2  # each image's negatives are the batch's other images
PRETRAINED = "pretrained"
# SSCD's descriptor width and GeM exponent.
SSCD_DIM = 512
SSCD_GEM_P = 3.0

COPY_DESCRIPTOR = ManifestSchema(
    name="copy_descriptor",
    version=1,
    fields=(
        pa.field("source", pa.string(), nullable=False),  # trained | pretrained
        # The weights file: inside the store, relative to the manifest's folder (the store may move).
        pa.field("path", pa.string()),
        # What the weights are: a trained descriptor's parameters and buffers (`weights_sha256`: the
        # TorchScript file's own bytes differ from one tracing process to another), else the file's sha256.
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("embedder", pa.string(), nullable=False),  # JSON: EmbedderConfig fields except path
    ),
)


@dataclass(frozen=True, kw_only=True, slots=True)
class CopyDescriptorConfig:
    pretrained: EmbedderConfig | None = None
    """Use this embedder instead of training one: a downloaded SSCD file ({kind: torchscript, path: ...,
    image_size: 320}), or ImageNet features ({kind: efficientnet_lite0}) as a baseline."""
    trunk: str = "efficientnet_lite0"
    trainable_blocks: int = 4
    """The trunk's last blocks that train; the others keep their ImageNet weights."""
    dim: int = SSCD_DIM
    gem_p: float = SSCD_GEM_P
    image_size: int = 224
    """Training crops and, in the dedup stages, the square resize of every image."""
    roles: tuple[Role, ...] = ("uncurated",)
    """Rows it trains on: the pool it will dedup."""
    train: DescriptorTrainConfig = field(default_factory=DescriptorTrainConfig)
    describe_batch_size: int = 64

    def __post_init__(self) -> None:
        check_trunk(self.trunk)
        require(self.dim >= 1, f"dim must be >= 1, got {self.dim}")
        require(self.gem_p >= 1, f"gem_p must be >= 1, got {self.gem_p}")
        require(
            self.image_size >= 32, f"image_size must be >= 32 (the trunk's stride), got {self.image_size}"
        )
        require(bool(self.roles), "roles must name at least one role")
        require(
            self.describe_batch_size >= 1, f"describe_batch_size must be >= 1, got {self.describe_batch_size}"
        )


def descriptor_fingerprint(cfg: CopyDescriptorConfig) -> str:
    """The weights a run starts from key it: the pretrained file, or the trunk's ImageNet weights."""
    return weights_fingerprint(cfg.pretrained) if cfg.pretrained is not None else trunk_fingerprint(cfg.trunk)


def training_images(images: KeyRanges, cfg: CopyDescriptorConfig, ctx: StageContext) -> list:
    """A seeded sample of the rows of `roles` (drawn by their place in key order), decoded to RGB
    thumbnails; unreadable rows are counted. Only the sampled rows are read."""
    rows = np.flatnonzero(images.column_is_in("role", cfg.roles))
    rng = np.random.default_rng(cfg.train.seed)
    chosen = np.sort(rng.choice(rows, size=min(len(rows), cfg.train.max_images), replace=False))
    decoded, unreadable = [], 0
    for row in images.offsets.read_rows(chosen, IMAGES.names).to_pylist():
        try:
            decoded.append(thumbnail(load_row_rgb(row), cfg.image_size))
        except OSError:
            unreadable += 1
    if unreadable:
        ctx.warn(f"{unreadable} of {len(chosen)} sampled images could not be read and were not trained on")
    return decoded


def run_copy_descriptor(
    cfg: CopyDescriptorConfig, inputs: Mapping[str, Manifest], ctx: StageContext
) -> dict[str, Any]:
    if cfg.pretrained is not None:
        path = None if cfg.pretrained.path is None else os.path.abspath(cfg.pretrained.path)
        sha256 = weights_fingerprint(cfg.pretrained)
        ctx.write_output("model", model_table(PRETRAINED, cfg.pretrained, path, sha256, ctx))
        return {"source": PRETRAINED, "kind": cfg.pretrained.kind}

    # Key order: the model depends on the rows, never on how upstream laid out their parts.
    images = stage_key_ranges(ctx, "images", inputs["images"].uri, IMAGES)
    started = time.perf_counter()
    pool = training_images(images, cfg, ctx)
    loaded_seconds = time.perf_counter() - started
    if len(pool) < MIN_TRAINING_IMAGES:
        # Why not an error here: a job whose pool is empty commits empty outputs; a dedup stage that
        # then has rows to describe says what is missing.
        ctx.warn(f"{len(pool)} images of roles {list(cfg.roles)} to train on: no descriptor trained")
        ctx.write_output("model", COPY_DESCRIPTOR.empty_table())
        return {"source": TRAINED, "images_trained_on": len(pool)}
    # Why fork: the projection's initial weights come from torch's global generator, which whatever ran
    # before in this process has advanced; seeded here, the model depends on the config alone.
    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed)
        net = build_descriptor_net(cfg.trunk, cfg.trainable_blocks, cfg.dim, cfg.gem_p)
        history = train_descriptor(net, pool, cfg.image_size, cfg.train, show_progress=ctx.show_progress)
    path = export_torchscript(net, cfg.image_size, ctx.local_dir(WEIGHTS_DIR) / MODEL_FILE)
    settings = EmbedderConfig(
        kind="torchscript", path=str(path), image_size=cfg.image_size, batch_size=cfg.describe_batch_size
    )
    ctx.write_output("model", model_table(TRAINED, settings, str(path), weights_sha256(net), ctx))
    first, last = history[0], history[-1]
    return {
        "source": TRAINED,
        "images_trained_on": len(pool),
        "steps": cfg.train.steps,
        "loss_first": first.loss,
        "loss_last": last.loss,
        "positive_similarity_last": last.positive_similarity,
        "hardest_negative_similarity_last": last.hardest_negative_similarity,
        "load_seconds": round(loaded_seconds, 3),
        "train_seconds": round(time.perf_counter() - started - loaded_seconds, 3),
        "history": [dataclasses.asdict(step) for step in history],
    }


def model_table(
    source: str, embedder: EmbedderConfig, path: str | None, sha256: str, ctx: StageContext
) -> pa.Table:
    """The one-row `copy_descriptor` manifest: the weights file (absolute `path`) and how to load it."""
    settings = {item.name: getattr(embedder, item.name) for item in dataclasses.fields(embedder)}
    settings["path"] = None  # the row's own `path` column says where the file is
    stored = None if path is None else location_in_manifest(path, ctx.output_uri("model"), ctx.store.root)
    row = {
        "source": source,
        "path": stored,
        "sha256": sha256,
        "embedder": json.dumps(settings),
    }
    return COPY_DESCRIPTOR.table_from_rows([row])


def descriptor_embedder(model: Manifest) -> EmbedderConfig:
    """The embedder a `copy_descriptor` manifest names, its weights file located wherever the store is."""
    rows = model.read(COPY_DESCRIPTOR).to_pylist()
    if len(rows) != 1:
        raise UserInputError(
            f"the copy_descriptor run at {model.uri} holds no model (its pool had too few images to train "
            "on): add uncurated images, or set copy_descriptor.pretrained"
        )
    (row,) = rows
    settings = json.loads(row["embedder"])
    if row["path"] is not None:
        settings["path"] = location_from_manifest(row["path"], model.uri)
    return build_config(EmbedderConfig, settings, "copy_descriptor")


COPY_DESCRIPTOR_STAGE = register_stage(
    StageSpec(
        name="copy_descriptor",
        # 2: initial weights seeded from the config; the row records the weights' sha256. 3: trains on its
        # rows in key order, whatever the layout of their parts
        version=3,
        config_type=CopyDescriptorConfig,
        fn=run_copy_descriptor,
        inputs={"images": IMAGES},
        outputs={"model": COPY_DESCRIPTOR},
        description="train a copy-detection descriptor on the pool (SSCD's recipe), or name a pretrained one",
        shown_stats={
            "images_trained_on": "images trained on",
            "steps": "steps",
            "loss_first": "loss, first step",
            "loss_last": "loss, last step",
            "train_seconds": "training seconds",
        },
        fingerprint=descriptor_fingerprint,
    )
)
