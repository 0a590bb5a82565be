"""The uncurated tar shards: Fashion-MNIST, Open Clip Art with its byte-identical groups, and near copies
of pool and eval images, shuffled into WebDataset-style tars whose bytes depend only on the config."""

from __future__ import annotations

import dataclasses
import io
import tarfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from curation.demo import ground_truth as gt
from curation.demo.config import CLIPART_MIN_SIDE, DemoDataConfig, random_stream, require
from curation.demo.ground_truth import Location, TruthRow
from curation.demo.sources import ClipArtFile, byte_identical_groups, list_openclipart, sha256_hex
from curation.demo.transforms import PNG_EXTENSION, TRANSFORMS, NearCopy, encode_png

POOL_SHARD_PATTERN = "pool-{:06d}.tar"
MEMBER_KEY_DIGITS = 8
TAR_FILE_MODE = 0o644
# Clip art: skip sources whose decode would dominate the build (a few declare over 600 M pixels).
CLIPART_MAX_SOURCE_PIXELS = 2_000_000
# Why: one Open Clip Art group holds 118 identical gradient files; whole, it would be a sixth of the clip art.
CLIPART_MAX_GROUP_MEMBERS = 8
PLACEHOLDER = Location("tar", "")

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class PoolItem:
    """One future tar member; its row's location is `PLACEHOLDER` until the shuffle places it.

    A near copy of another pool item names that original by index (`copy_of_item`), because the
    original's location is only known after the shuffle too.
    """

    data: bytes
    extension: str
    row: TruthRow
    copy_of_item: int | None = None


def write_pool_shards(
    root: Path,
    cfg: DemoDataConfig,
    fashion_items: list[PoolItem],
    eval_rows: Sequence[TruthRow],
    report: Progress,
) -> tuple[list[TruthRow], dict[Location, bytes]]:
    """Adds clip art and near copies to `fashion_items`, shuffles, and writes the tar shards.

    Args:
        root: the folder being built; eval images are read back from it to make their near copies.
        cfg: counts and seed.
        fashion_items: the Fashion-MNIST pool images, already encoded.
        eval_rows: the rows of the eval images written under `root`.
        report: progress callback.

    Returns:
        The shard rows in member order, and each member's bytes by location.
    """
    items = list(fashion_items)
    report("downscaling Open Clip Art")
    items += _clipart_items(cfg)
    originals = list(range(len(items)))
    report("transforming near copies")
    items += _pool_near_copies(cfg, items, originals)
    items += _eval_near_copies(cfg, eval_rows, root)

    order = random_stream(cfg.seed, "shard_order").permutation(len(items))
    locations: list[Location] = [PLACEHOLDER] * len(items)
    for position, item_index in enumerate(order):
        shard = POOL_SHARD_PATTERN.format(position // cfg.shard_size)
        member = f"{position:0{MEMBER_KEY_DIGITS}d}{items[item_index].extension}"
        locations[item_index] = Location("tar", f"{gt.POOL_SHARDS}/{shard}", member=member)

    rows = []
    for item_index in order:
        item = items[item_index]
        row = dataclasses.replace(item.row, location=locations[item_index])
        if item.copy_of_item is not None:
            row = dataclasses.replace(row, copy_of=locations[item.copy_of_item])
        rows.append(row)
    _write_tars(root, [(locations[i], items[i].data) for i in order])
    return rows, {locations[i]: items[i].data for i in order}


def _write_tars(root: Path, members: list[tuple[Location, bytes]]) -> None:
    """Writes members in the given order; headers carry no time, owner or host detail (reproducible)."""
    by_shard: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    for location, data in members:
        by_shard[location.path].append((location.member, data))
    for relative, shard_members in sorted(by_shard.items()):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in shard_members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, TAR_FILE_MODE
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))


def _clipart_items(cfg: DemoDataConfig) -> list[PoolItem]:
    """Whole byte-identical groups (written as the same bytes) plus clip art that occurs only once."""
    if cfg.pool_clipart_count == 0:
        return []
    files = [clip for clip in list_openclipart() if _clipart_usable(clip, cfg.clipart_max_side)]
    groups = {
        sha: members
        for sha, members in byte_identical_groups(files).items()
        if len(members) <= CLIPART_MAX_GROUP_MEMBERS
    }
    rng = random_stream(cfg.seed, "openclipart")
    chosen_groups: list[list[ClipArtFile]] = []
    budget = cfg.pool_clipart_count
    for sha in rng.permutation(sorted(groups)):
        members = groups[str(sha)]
        if len(chosen_groups) < cfg.clipart_duplicate_groups and len(members) <= budget:
            chosen_groups.append(members)
            budget -= len(members)
    counts: dict[str, int] = defaultdict(int)
    for clip in files:
        counts[clip.sha256] += 1
    singles = [clip for clip in files if counts[clip.sha256] == 1]
    require(budget <= len(singles), "pool_clipart_count", f"only {len(singles)} distinct clip-art files fit")
    picked = [singles[i] for i in sorted(rng.choice(len(singles), budget, replace=False))]

    items = []
    for members in chosen_groups:
        data = _clipart_bytes(members[0], cfg.clipart_max_side)  # once per group: members stay identical
        items += [_clipart_item(clip, data, clip.sha256) for clip in members]
    for clip in picked:
        items.append(_clipart_item(clip, _clipart_bytes(clip, cfg.clipart_max_side), None))
    return items


def _clipart_usable(clip: ClipArtFile, max_side: int) -> bool:
    scale = min(1.0, max_side / max(clip.width, clip.height))
    small_enough = clip.width * clip.height <= CLIPART_MAX_SOURCE_PIXELS
    return small_enough and min(clip.width, clip.height) * scale >= CLIPART_MIN_SIDE


def _clipart_bytes(clip: ClipArtFile, max_side: int) -> bytes:
    """The file's own bytes when small enough, else a downscaled PNG (alpha and grey kept)."""
    data = clip.path.read_bytes()
    if max(clip.width, clip.height) <= max_side:
        return data
    with Image.open(io.BytesIO(data)) as img:
        keep = img.mode if img.mode in ("L", "LA", "RGB", "RGBA") else "RGBA"
        small = img.convert(keep)
        small.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return encode_png(small)


def _clipart_item(clip: ClipArtFile, data: bytes, group: str | None) -> PoolItem:
    row = TruthRow(
        source=gt.POOL_SHARDS,
        location=PLACEHOLDER,
        sha256=sha256_hex(data),
        origin=gt.ORIGIN_OPENCLIPART,
        kind=gt.KIND_ORIGINAL,
        label=clip.category,
        group=group,
    )
    return PoolItem(data, PNG_EXTENSION, row)


def _transform_cycle(count: int, rng: np.random.Generator) -> list[str]:
    """Transform names in a shuffled round robin, so even a handful of copies covers every transform."""
    names = sorted(TRANSFORMS)
    return [names[i % len(names)] for i in rng.permutation(count)]


def _near_copy(data: bytes, transform: str, rng: np.random.Generator) -> NearCopy:
    """Applies `transform`; when it leaves the bytes unchanged (brightening an all-white image, say),
    the next transforms in name order are tried, so a near copy never equals its original."""
    names = sorted(TRANSFORMS)
    start = names.index(transform)
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        for name in names[start:] + names[:start]:
            copy = TRANSFORMS[name](img, rng)
            if copy.data != data:
                return copy
    raise ValueError(f"every transform returned the image unchanged ({len(data)} bytes)")


def _pool_near_copies(cfg: DemoDataConfig, items: list[PoolItem], originals: list[int]) -> list[PoolItem]:
    rng = random_stream(cfg.seed, "pool_near_copies")
    count = cfg.pool_near_copy_count
    sources = rng.choice(originals, count, replace=count > len(originals)) if count else []
    copies = []
    for source_index, transform in zip(sources, _transform_cycle(count, rng), strict=True):
        original = items[int(source_index)]
        copy = _near_copy(original.data, transform, rng)
        row = dataclasses.replace(
            original.row,
            sha256=sha256_hex(copy.data),
            kind=gt.KIND_NEAR_COPY,
            copy_of_sha256=original.row.sha256,
            transform=copy.transform,
        )
        copies.append(PoolItem(copy.data, copy.extension, row, copy_of_item=int(source_index)))
    return copies


def _eval_near_copies(cfg: DemoDataConfig, eval_rows: Sequence[TruthRow], root: Path) -> list[PoolItem]:
    rng = random_stream(cfg.seed, "eval_near_copies")
    count = cfg.eval_near_copy_count
    picked = sorted(rng.choice(len(eval_rows), count, replace=False)) if count else []
    copies = []
    for position, transform in zip(picked, _transform_cycle(count, rng), strict=True):
        original = eval_rows[position]
        copy = _near_copy((root / original.location.path).read_bytes(), transform, rng)
        row = dataclasses.replace(
            original,
            source=gt.POOL_SHARDS,
            location=PLACEHOLDER,
            sha256=sha256_hex(copy.data),
            kind=gt.KIND_EVAL_NEAR_COPY,
            copy_of=original.location,
            copy_of_sha256=original.sha256,
            transform=copy.transform,
        )
        copies.append(PoolItem(copy.data, copy.extension, row))
    return copies
