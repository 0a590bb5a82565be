"""The training loader: batches are a pure function of (seed, step, rank, W, B, manifest)."""

from __future__ import annotations

import hashlib
import io
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipelines.manifest import IMAGES, ROW_KEY_COLUMNS
from training.config import CropsConfig, PretrainConfig, StudentConfig, TrainConfig
from training.data.augment import MultiCropAugmentation
from training.data.dataset import (
    CuratedImages,
    ImageLoadError,
    derive_seed,
    image_index,
    make_train_loader,
    step_positions,
)

NUM_IMAGES = 7  # not a multiple of any batch size below, so batches straddle passes
BATCH_SIZE = 3
SEED = 5
PATCH, GLOBAL_SIZE, LOCAL_SIZE, N_LOCAL = 7, 28, 14, 2  # a 4 x 4 mask grid
TENSOR_KEYS = (
    "collated_global_crops",
    "collated_local_crops",
    "collated_masks",
    "mask_indices_list",
    "masks_weight",
    "n_masked_patches",
)


def write_png(path: Path, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(30 + seed, 36, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def manifest_row(path: Path, data: bytes) -> dict:
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
    return {
        "image_id": hashlib.sha256(data).hexdigest(),
        "source": "test",
        "role": "curated",
        "uri": str(path),
        "container": "file",
        "byte_offset": None,
        "byte_size": len(data),
        "width": width,
        "height": height,
        "format": "PNG",
        "mode": "RGB",
        "num_frames": 1,
    }


@pytest.fixture
def table(tmp_path: Path) -> pa.Table:
    rows = []
    for seed in range(NUM_IMAGES):
        path = tmp_path / f"img{seed}.png"
        rows.append(manifest_row(path, write_png(path, seed)))
    return IMAGES.table_from_rows(rows)


def tiny_config(batch_size: int = BATCH_SIZE) -> PretrainConfig:
    return PretrainConfig(
        student=StudentConfig(patch_size=PATCH),
        crops=CropsConfig(
            global_crops_size=GLOBAL_SIZE, local_crops_size=LOCAL_SIZE, local_crops_number=N_LOCAL
        ),
        train=TrainConfig(batch_size_per_gpu=batch_size, seed=SEED),
    )


def take(
    table: pa.Table,
    count: int,
    *,
    start_step: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = BATCH_SIZE,
) -> list[dict]:
    loader = make_train_loader(
        table,
        tiny_config(batch_size),
        rank=rank,
        world_size=world_size,
        start_step=start_step,
        num_workers=num_workers,
    )
    batches = list(islice(loader, count))
    del loader  # shuts worker processes down now
    return batches


def assert_same_batch(first: dict, second: dict) -> None:
    for key in TENSOR_KEYS:
        assert torch.equal(first[key], second[key]), key
    assert first["upperbound"] == second["upperbound"]


def test_batch_shapes(table):
    (batch,) = take(table, 1)
    assert batch["collated_global_crops"].shape == (2 * BATCH_SIZE, 3, GLOBAL_SIZE, GLOBAL_SIZE)
    assert batch["collated_local_crops"].shape == (N_LOCAL * BATCH_SIZE, 3, LOCAL_SIZE, LOCAL_SIZE)
    assert batch["collated_masks"].shape == (2 * BATCH_SIZE, (GLOBAL_SIZE // PATCH) ** 2)
    assert batch["collated_global_crops"].dtype == torch.float32
    assert int(batch["collated_masks"].any(dim=1).sum()) == BATCH_SIZE  # int(2B * 0.5), all placeable


def test_batches_do_not_depend_on_workers_or_on_where_the_run_resumed(table):
    fresh = take(table, 4)
    resumed_with_workers = take(table, 2, start_step=2, num_workers=2)
    for step, batch in zip((2, 3), resumed_with_workers, strict=True):
        assert_same_batch(fresh[step], batch)
    assert not torch.equal(fresh[0]["collated_global_crops"], fresh[1]["collated_global_crops"])


def test_batches_do_not_depend_on_row_order_or_where_the_images_live(table, tmp_path):
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    rows = []
    for row in reversed(table.to_pylist()):  # reversed rows, every file copied to another folder
        path = moved / Path(row["uri"]).name
        path.write_bytes(Path(row["uri"]).read_bytes())
        rows.append({**row, "uri": str(path)})
    for batch, moved_batch in zip(take(table, 3), take(IMAGES.table_from_rows(rows), 3), strict=True):
        assert_same_batch(batch, moved_batch)


def test_a_sample_is_its_image_augmented_under_its_position_seed(table):
    (batch,) = take(table, 1, start_step=1)
    position = step_positions(1, 0, 1, BATCH_SIZE)[0]
    ordered = table.sort_by([(column, "ascending") for column in ROW_KEY_COLUMNS])
    image = CuratedImages(ordered)[image_index(position, NUM_IMAGES, SEED)]
    torch.manual_seed(derive_seed(SEED, "augment", position))
    crops = MultiCropAugmentation(tiny_config().crops)(image)
    assert torch.equal(batch["collated_global_crops"][0], crops["global_crops"][0])
    assert torch.equal(batch["collated_global_crops"][BATCH_SIZE], crops["global_crops"][1])
    assert torch.equal(batch["collated_local_crops"][BATCH_SIZE], crops["local_crops"][1])


def test_two_ranks_split_the_global_batch_of_one_process(table):
    # One process with batch 2B holds the same positions, hence the same crops, as ranks 0 and 1 with B.
    steps = 2
    whole = take(table, steps, batch_size=2 * BATCH_SIZE)
    halves = [take(table, steps, rank=rank, world_size=2) for rank in (0, 1)]
    for step in range(steps):
        for view in range(2):
            crops = whole[step]["collated_global_crops"][view * 2 * BATCH_SIZE : (view + 1) * 2 * BATCH_SIZE]
            split = [
                halves[rank][step]["collated_global_crops"][view * BATCH_SIZE : (view + 1) * BATCH_SIZE]
                for rank in (0, 1)
            ]
            assert torch.equal(crops, torch.cat(split))
        for view in range(N_LOCAL):
            crops = whole[step]["collated_local_crops"][view * 2 * BATCH_SIZE : (view + 1) * 2 * BATCH_SIZE]
            split = [
                halves[rank][step]["collated_local_crops"][view * BATCH_SIZE : (view + 1) * BATCH_SIZE]
                for rank in (0, 1)
            ]
            assert torch.equal(crops, torch.cat(split))


def test_ranks_hold_disjoint_consecutive_slices_of_the_step():
    world_size = 3
    held = [
        p
        for step in range(4)
        for rank in range(world_size)
        for p in step_positions(step, rank, world_size, BATCH_SIZE)
    ]
    assert held == list(range(4 * world_size * BATCH_SIZE))


def test_each_pass_shows_every_image_once_in_a_new_order():
    orders = [
        [image_index(p, NUM_IMAGES, SEED) for p in range(e * NUM_IMAGES, (e + 1) * NUM_IMAGES)]
        for e in range(3)
    ]
    for order in orders:
        assert sorted(order) == list(range(NUM_IMAGES))
    assert len({tuple(order) for order in orders}) == 3
    assert orders[0] != [image_index(p, NUM_IMAGES, SEED + 1) for p in range(NUM_IMAGES)]


def test_the_loader_leaves_the_global_torch_stream_alone(table):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    take(table, 1)
    assert torch.equal(torch.rand(3), expected)


def test_a_bad_row_names_its_uri(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    missing = tmp_path / "missing.png"
    table = IMAGES.table_from_rows([manifest_row_for_any(broken), manifest_row_for_any(missing)])
    images = CuratedImages(table)
    for index, path in enumerate((broken, missing)):
        with pytest.raises(ImageLoadError, match=str(path)):
            images[index]


def manifest_row_for_any(path: Path) -> dict:
    """A row for a file that need not decode (or exist)."""
    return {
        "image_id": path.name,
        "source": "test",
        "role": "curated",
        "uri": str(path),
        "container": "file",
        "byte_offset": None,
        "byte_size": 0,
        "width": 1,
        "height": 1,
        "format": "PNG",
        "mode": "RGB",
        "num_frames": 1,
    }


def test_seeds_differ_per_stream_and_part():
    seeds = {derive_seed(SEED, stream, part) for stream in ("order", "augment", "mask") for part in range(50)}
    assert len(seeds) == 150 and all(0 <= seed < 2**63 for seed in seeds)
