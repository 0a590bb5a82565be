"""Builds the demo scenario: curated seed sets, an uncurated pool in three storage layouts, an eval set,
and a ground-truth table saying which pool images are copies of what. See README.md for the layout.

    Fashion-MNIST train --> seed_fashion/ (3 classes)            Tux Paint --> seed_tuxpaint/
                        +-> pool_shards/*.tar, pool_web.parquet (never a seed image)
    Fashion-MNIST test  --> eval_fashion_test/ --transformed--> hidden in pool_shards (contamination)
    Open Clip Art --downscaled, byte-identical groups kept whole--> pool_shards
    pool images --transformed--> pool_shards (near copies);  pool_shards --same bytes--> pool_web
    Adwaita --> pool_icons/ (one icon, many sizes)               corrupt.py --> pool_junk/
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curation.demo import ground_truth as gt
from curation.demo.config import DemoDataConfig, random_stream, require
from curation.demo.corrupt import write_corrupt_cases
from curation.demo.ground_truth import Location, TruthRow
from curation.demo.shards import MEMBER_KEY_DIGITS, PLACEHOLDER, PoolItem, Progress, write_pool_shards
from curation.demo.sources import (
    PNG_COLOUR_TYPE_RGBA,
    list_adwaita_icons,
    list_tuxpaint_stamps,
    read_png_header,
    sha256_hex,
)
from curation.demo.transforms import PNG_EXTENSION, encode_png
from pipelines.datasets import FASHION_MNIST_CLASSES, FashionMnist, read_fashion_mnist
from pipelines.images import DEFAULT_BYTES_COLUMN

# Bump when the code writes different bytes for the same config, so old builds are not reused.
DEMO_FORMAT_VERSION = 1
GROUND_TRUTH_FILE = "ground_truth.parquet"
CONFIG_FILE = "demo_config.json"
STAGING_SUFFIX = ".tmp"
FILE_INDEX_DIGITS = 5  # Fashion-MNIST indices go up to 59999
WEB_KEY_COLUMN = "key"
# Tux Paint seeds: colour cut-outs (RGBA) big enough to be photos rather than glyphs or tiny symbols.
TUXPAINT_SEED_MIN_SIDE = 64


def _config_record(cfg: DemoDataConfig) -> dict[str, object]:
    """What demo_config.json holds; JSON round-tripped so tuples compare equal to the lists read back."""
    return json.loads(json.dumps({"format_version": DEMO_FORMAT_VERSION, **dataclasses.asdict(cfg)}))


def _already_built(root: Path, record: dict[str, object]) -> bool:
    config_path = root / CONFIG_FILE
    if not (root / GROUND_TRUTH_FILE).is_file() or not config_path.is_file():
        return False
    try:
        return json.loads(config_path.read_text()) == record
    except json.JSONDecodeError:
        return False


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _write_file(root: Path, relative: str, data: bytes) -> Location:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return Location("folder", relative)


def build_demo_data(
    out_dir: str | os.PathLike, cfg: DemoDataConfig | None = None, progress: Progress | None = None
) -> Path:
    """Writes the demo scenario into `out_dir` and returns its absolute path.

    The build goes into `<out_dir>.tmp`, which replaces `out_dir` only when complete. When `out_dir`
    already holds a finished build of the same config, nothing is done.

    Args:
        out_dir: the folder to create (replaced if it holds a build of another config).
        cfg: the counts and seed; defaults to `DemoDataConfig()`.
        progress: called with one line per step; the build prints nothing itself.

    Raises:
        MissingSourceError: a Debian package with source images is not installed.
    """
    cfg = cfg or DemoDataConfig()
    root = Path(out_dir).absolute()
    record = _config_record(cfg)
    if _already_built(root, record):
        return root
    report = progress or (lambda _message: None)
    staging = root.with_name(root.name + STAGING_SUFFIX)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        num_rows = _write_all(staging, root, cfg, report)
        (staging / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # Why: a half-written folder is never left to look done
        raise
    if root.exists():
        shutil.rmtree(root)
    staging.rename(root)
    report(f"demo data ready: {num_rows} ground-truth rows in {root}")
    return root


def _write_all(staging: Path, root: Path, cfg: DemoDataConfig, report: Progress) -> int:
    """Writes every source and the ground truth into `staging`, with URIs that point into `root`.

    Sources are written, and rows listed, in a fixed order (seeds, eval, shards, icons, web, junk):
    that order decides which of two byte-identical images counts as the original.
    """
    report("reading Fashion-MNIST")
    train, test = read_fashion_mnist("train"), read_fashion_mnist("test")
    train_split = _split_fashion_train(train, cfg)
    rows = _write_fashion_seeds(staging, train, train_split.seeds)
    report("writing Tux Paint seeds")
    rows += _write_tuxpaint_seeds(staging, cfg)
    report("writing the eval set")
    eval_rows = _write_eval(staging, test, cfg)
    rows += eval_rows
    report("writing the tar shards")
    fashion_items = _pool_fashion_items(train, train_split.pool)
    shard_rows, shard_bytes = write_pool_shards(staging, cfg, fashion_items, eval_rows, report)
    rows += shard_rows
    report("writing Adwaita icons")
    rows += _write_icons(staging, cfg)
    report("writing pool_web.parquet")
    rows += _write_web(staging, cfg, train, train_split.web, shard_rows, shard_bytes)
    report("writing corrupt files")
    rows += _write_junk(staging)
    table = gt.ground_truth_table(gt.mark_exact_copies(rows), root)
    gt.write_ground_truth(table, staging / GROUND_TRUTH_FILE)
    return table.num_rows


# --- Fashion-MNIST: seeds, pool and eval -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _TrainSplit:
    """Disjoint sets of Fashion-MNIST train indices, each sorted."""

    seeds: np.ndarray
    pool: np.ndarray
    web: np.ndarray


def _split_fashion_train(train: FashionMnist, cfg: DemoDataConfig) -> _TrainSplit:
    rng = random_stream(cfg.seed, "fashion_train_split")
    seeds = [
        rng.choice(
            np.flatnonzero(train.labels == FASHION_MNIST_CLASSES.index(name)),
            cfg.seed_fashion_per_class,
            replace=False,
        )
        for name in cfg.seed_fashion_classes
    ]
    seed_indices = np.sort(np.concatenate(seeds)) if seeds else np.zeros(0, dtype=np.int64)
    rest = np.setdiff1d(np.arange(len(train.labels)), seed_indices)
    chosen = rng.choice(rest, cfg.pool_fashion_count + cfg.web_fashion_count, replace=False)
    return _TrainSplit(
        seeds=seed_indices,
        pool=np.sort(chosen[: cfg.pool_fashion_count]),
        web=np.sort(chosen[cfg.pool_fashion_count :]),
    )


def _fashion_row(source: str, origin: str, location: Location, data: bytes, label_id: int) -> TruthRow:
    return TruthRow(
        source=source,
        location=location,
        sha256=sha256_hex(data),
        origin=origin,
        kind=gt.KIND_ORIGINAL,
        label=FASHION_MNIST_CLASSES[label_id],
        label_id=label_id,
    )


def _pool_fashion_items(train: FashionMnist, indices: np.ndarray) -> list[PoolItem]:
    items = []
    for index in indices:
        data = encode_png(Image.fromarray(train.images[index]))
        row = _fashion_row(
            gt.POOL_SHARDS, gt.ORIGIN_FASHION_TRAIN, PLACEHOLDER, data, int(train.labels[index])
        )
        items.append(PoolItem(data, PNG_EXTENSION, row))
    return items


def _write_fashion_seeds(root: Path, train: FashionMnist, indices: np.ndarray) -> list[TruthRow]:
    rows = []
    for index in indices:
        label_id = int(train.labels[index])
        relative = (
            f"{gt.SEED_FASHION}/{_slug(FASHION_MNIST_CLASSES[label_id])}/{index:0{FILE_INDEX_DIGITS}d}.png"
        )
        data = encode_png(Image.fromarray(train.images[index]))
        location = _write_file(root, relative, data)
        rows.append(_fashion_row(gt.SEED_FASHION, gt.ORIGIN_FASHION_TRAIN, location, data, label_id))
    return rows


def _write_eval(root: Path, test: FashionMnist, cfg: DemoDataConfig) -> list[TruthRow]:
    rng = random_stream(cfg.seed, "eval")
    indices = np.sort(rng.choice(len(test.labels), cfg.eval_count, replace=False))
    rows = []
    for index in indices:
        label_id = int(test.labels[index])
        data = encode_png(Image.fromarray(test.images[index]))
        location = _write_file(root, f"{gt.EVAL_FASHION_TEST}/{index:0{FILE_INDEX_DIGITS}d}.png", data)
        rows.append(_fashion_row(gt.EVAL_FASHION_TEST, gt.ORIGIN_FASHION_TEST, location, data, label_id))
    return rows


# --- Tux Paint seeds -------------------------------------------------------------------------------


def _write_tuxpaint_seeds(root: Path, cfg: DemoDataConfig) -> list[TruthRow]:
    """Colour cut-outs of a useful size, one per distinct content, copied byte for byte."""
    if cfg.seed_tuxpaint_count == 0:
        return []  # Why: a config that needs no stamps must build without their package installed
    candidates, seen = [], set()
    for stamp in list_tuxpaint_stamps():
        data = stamp.path.read_bytes()
        header = read_png_header(data)
        sha = sha256_hex(data)
        if header is None or sha in seen:
            continue
        if (
            header.colour_type == PNG_COLOUR_TYPE_RGBA
            and min(header.width, header.height) >= TUXPAINT_SEED_MIN_SIDE
        ):
            seen.add(sha)
            candidates.append((stamp, data, sha))
    require(
        cfg.seed_tuxpaint_count <= len(candidates),
        "seed_tuxpaint_count",
        f"only {len(candidates)} suitable Tux Paint stamps are installed",
    )
    picked = random_stream(cfg.seed, "tuxpaint").choice(
        len(candidates), cfg.seed_tuxpaint_count, replace=False
    )
    rows = []
    for position in sorted(picked):
        stamp, data, sha = candidates[position]
        location = _write_file(root, f"{gt.SEED_TUXPAINT}/{stamp.label}/{stamp.name}.png", data)
        rows.append(
            TruthRow(
                source=gt.SEED_TUXPAINT,
                location=location,
                sha256=sha,
                origin=gt.ORIGIN_TUXPAINT,
                kind=gt.KIND_ORIGINAL,
                label=stamp.label,
            )
        )
    return rows


# --- Icons, web Parquet, junk ----------------------------------------------------------------------


def _write_icons(root: Path, cfg: DemoDataConfig) -> list[TruthRow]:
    """Icon names drawn at two sizes or more, each written at all of its sizes: natural near copies."""
    if cfg.icon_name_count == 0:
        return []
    by_name = defaultdict(list)
    for icon in list_adwaita_icons(min_size=cfg.icon_min_size):
        by_name[icon.name].append(icon)
    names = sorted(name for name, icons in by_name.items() if len({icon.size for icon in icons}) > 1)
    require(
        cfg.icon_name_count <= len(names), "icon_name_count", f"only {len(names)} icon names have 2+ sizes"
    )
    picked = [
        names[i]
        for i in sorted(
            random_stream(cfg.seed, "icons").choice(len(names), cfg.icon_name_count, replace=False)
        )
    ]
    rows = []
    for name in picked:
        for icon in by_name[name]:
            data = icon.path.read_bytes()
            relative = f"{gt.POOL_ICONS}/{icon.size}x{icon.size}/{icon.context}/{icon.path.name}"
            rows.append(
                TruthRow(
                    source=gt.POOL_ICONS,
                    location=_write_file(root, relative, data),
                    sha256=sha256_hex(data),
                    origin=gt.ORIGIN_ADWAITA,
                    kind=gt.KIND_ORIGINAL,
                    label=name,
                    group=name,
                )
            )
    return rows


def _write_web(
    root: Path,
    cfg: DemoDataConfig,
    train: FashionMnist,
    web_indices: np.ndarray,
    shard_rows: list[TruthRow],
    shard_bytes: dict[Location, bytes],
) -> list[TruthRow]:
    """Fresh Fashion-MNIST images plus byte copies of tar members, shuffled, in small row groups."""
    entries: list[tuple[bytes, TruthRow]] = []
    for index in web_indices:
        data = encode_png(Image.fromarray(train.images[index]))
        entries.append(
            (
                data,
                _fashion_row(
                    gt.POOL_WEB,
                    gt.ORIGIN_FASHION_TRAIN,
                    Location("parquet", ""),
                    data,
                    int(train.labels[index]),
                ),
            )
        )
    rng = random_stream(cfg.seed, "web")
    # Copy only plain originals, so each copy points at the first bytes of their kind.
    targets = [row for row in shard_rows if row.kind == gt.KIND_ORIGINAL and row.group is None]
    require(
        cfg.web_exact_copy_count <= len(targets),
        "web_exact_copy_count",
        f"only {len(targets)} tar members are plain originals to copy",
    )
    for position in sorted(rng.choice(len(targets), cfg.web_exact_copy_count, replace=False)):
        original = targets[position]
        data = shard_bytes[original.location]
        row = dataclasses.replace(
            original,
            source=gt.POOL_WEB,
            kind=gt.KIND_EXACT_COPY,
            copy_of=original.location,
            copy_of_sha256=original.sha256,
        )
        entries.append((data, row))
    relative = f"{gt.POOL_WEB}.parquet"
    rows, keys, images = [], [], []
    for row_index, entry_index in enumerate(rng.permutation(len(entries))):
        data, row = entries[entry_index]
        keys.append(f"{row_index:0{MEMBER_KEY_DIGITS}d}")
        images.append(data)
        rows.append(dataclasses.replace(row, location=Location("parquet", relative, row=row_index)))
    table = pa.table(
        {WEB_KEY_COLUMN: pa.array(keys, pa.string()), DEFAULT_BYTES_COLUMN: pa.array(images, pa.binary())}
    )
    # Why no compression: the cells are PNG bytes already; small row groups make several ingest shards.
    pq.write_table(table, root / relative, row_group_size=cfg.web_row_group_size, compression="none")
    return rows


def _write_junk(root: Path) -> list[TruthRow]:
    """The corrupt and odd-but-valid files; `transform` records which case each file is."""
    folder = root / gt.POOL_JUNK
    rows = []
    for case in write_corrupt_cases(folder):
        path = folder / case.filename
        sha = (
            sha256_hex(path.read_bytes()) if path.exists() else None
        )  # exists() is False for a dangling link
        rows.append(
            TruthRow(
                source=gt.POOL_JUNK,
                location=Location("folder", f"{gt.POOL_JUNK}/{case.filename}"),
                sha256=sha,
                origin=gt.ORIGIN_SYNTHETIC,
                kind=gt.KIND_CORRUPT,
                transform=case.kind,
                expected_reject=case.expected_reason,
            )
        )
    return rows
