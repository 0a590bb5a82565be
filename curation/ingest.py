"""The `ingest` stage: list every source, decode-check every image, write `images` and `rejected`.

sources (folders | tar shards | Parquet) --plan--> shards (ids from file names, sizes, mtimes)
  --executor--> per shard: read bytes -> sha256 -> probe_image -> images row | rejected row
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.images import (
    DEFAULT_BYTES_COLUMN,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    IMAGE_EXTENSIONS,
    DecodeLimits,
    ProbedImage,
    RawItem,
    iter_folder_files,
    iter_parquet_images,
    iter_tar_images,
    list_folder_images,
    probe_image,
)
from pipelines.manifest import IMAGES, REJECTED, Role
from pipelines.stage import Manifest, Shard, ShardResult, StageContext, StageSpec, register_stage
from pipelines.store import sha256_text
from pipelines.validation import UserInputError, require

SHARD_ID_LENGTH = 16
TAR_SUFFIX = ".tar"
PARQUET_SUFFIX = ".parquet"

SourceKind = Literal["folder", "tar", "parquet"]


@dataclass(frozen=True, kw_only=True, slots=True)
class SourceConfig:
    """One image source. `path` is a folder, a tar file or folder of tars, or a Parquet file or folder."""

    name: str
    role: Role
    kind: SourceKind
    path: str
    bytes_column: str = DEFAULT_BYTES_COLUMN
    """Parquet sources only: the binary column holding encoded image bytes."""
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    """Folder and tar sources: file name endings that count as images (case-insensitive)."""

    def __post_init__(self) -> None:
        require(
            bool(self.name) and self.name.replace("_", "").replace("-", "").isalnum(),
            f"must be letters, digits, '_' or '-', got {self.name!r}",
        )
        require(bool(self.path), "path must not be empty")


@dataclass(frozen=True, kw_only=True, slots=True)
class IngestConfig:
    sources: tuple[SourceConfig, ...] = ()
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Decompression-bomb guard: images with more pixels are rejected before decoding."""
    min_side: int = DEFAULT_MIN_SIDE
    """Images whose shorter side is smaller are rejected as too small."""
    max_bytes: int = DEFAULT_MAX_BYTES
    """Files (and tar members, Parquet cells) larger than this are rejected unread; so are special files
    (FIFOs, devices) in folder sources, which are never opened."""
    files_per_shard: int = 512
    """Folder sources: files per unit of parallel work and resume."""
    row_groups_per_shard: int = 4
    """Parquet sources: row groups per unit of parallel work and resume."""

    def __post_init__(self) -> None:
        require(self.max_pixels > 0, f"max_pixels must be > 0, got {self.max_pixels}")
        require(self.min_side >= 1, f"min_side must be >= 1, got {self.min_side}")
        require(self.max_bytes >= 1, f"max_bytes must be >= 1, got {self.max_bytes}")
        require(self.files_per_shard >= 1, f"files_per_shard must be >= 1, got {self.files_per_shard}")
        require(
            self.row_groups_per_shard >= 1,
            f"row_groups_per_shard must be >= 1, got {self.row_groups_per_shard}",
        )
        names = [source.name for source in self.sources]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        require(not duplicates, f"source names must be unique, repeated: {duplicates}")


@dataclass(frozen=True, slots=True)
class ShardInput:
    """What one ingest shard reads: a run of folder files, one tar, or some row groups of one Parquet."""

    source: str
    role: str
    kind: str
    uris: tuple[str, ...] = ()
    path: str = ""
    row_groups: tuple[int, ...] = ()
    bytes_column: str = ""
    extensions: tuple[str, ...] = ()


def _file_identity(path: str | os.PathLike) -> str:
    """Name, size and mtime: enough to notice a changed file without reading it."""
    stat = os.stat(path)
    return f"{Path(path).absolute()}|{stat.st_size}|{stat.st_mtime_ns}"


def _shard_id(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:SHARD_ID_LENGTH]


def _files_with_suffix(path: Path, suffix: str) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(candidate for candidate in path.rglob(f"*{suffix}") if candidate.is_file())


def _source_shards(source: SourceConfig, cfg: IngestConfig) -> tuple[list[Shard], int]:
    path = Path(source.path)
    if not path.exists():
        raise FileNotFoundError(f"source {source.name!r}: {path} does not exist")
    common = {"source": source.name, "role": source.role, "kind": source.kind}
    if source.kind == "folder":
        uris, num_ignored = list_folder_images(path, source.extensions)
        shards = []
        for start in range(0, len(uris), cfg.files_per_shard):
            chunk = tuple(uris[start : start + cfg.files_per_shard])
            identities = [_link_safe_identity(uri) for uri in chunk]
            shards.append(Shard(_shard_id(source.name, *identities), ShardInput(**common, uris=chunk)))
        return shards, num_ignored
    if source.kind == "tar":
        return [
            Shard(
                _shard_id(source.name, _file_identity(tar)),
                ShardInput(**common, path=str(tar.absolute()), extensions=source.extensions),
            )
            for tar in _files_with_suffix(path, TAR_SUFFIX)
        ], 0
    shards = []
    for parquet in _files_with_suffix(path, PARQUET_SUFFIX):
        num_groups = checked_parquet(source, parquet).metadata.num_row_groups
        for start in range(0, num_groups, cfg.row_groups_per_shard):
            groups = tuple(range(start, min(start + cfg.row_groups_per_shard, num_groups)))
            shard_id = _shard_id(source.name, _file_identity(parquet), source.bytes_column, *map(str, groups))
            payload = ShardInput(
                **common, path=str(parquet.absolute()), row_groups=groups, bytes_column=source.bytes_column
            )
            shards.append(Shard(shard_id, payload))
    return shards, 0


class SourceError(UserInputError):
    """A source that cannot be read as its kind says (named in the message, with what is wrong)."""


def checked_parquet(source: SourceConfig, path: Path) -> pq.ParquetFile:
    """A Parquet source file whose `bytes_column` holds binary values, opened.

    Raises:
        SourceError: the file is not Parquet, lacks the column, or the column holds something else.
    """
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise SourceError(f"source {source.name!r}: {path} is not a readable Parquet file: {err}") from None
    schema = parquet.schema_arrow
    if source.bytes_column not in schema.names:
        raise SourceError(
            f"source {source.name!r}: {path} has no column {source.bytes_column!r} (set bytes_column); "
            f"columns: {', '.join(schema.names)}"
        )
    kind = schema.field(source.bytes_column).type
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise SourceError(
            f"source {source.name!r}: column {source.bytes_column!r} of {path} holds {kind}, not image bytes "
            "(binary)"
        )
    return parquet


def _link_safe_identity(uri: str) -> str:
    # Why: a dangling symlink has no size or mtime but is still an input that must get a rejected row.
    try:
        return _file_identity(uri)
    except OSError:
        return f"{uri}|unreadable"


def plan_ingest(cfg: IngestConfig) -> tuple[list[Shard], int]:
    """All shards of all sources, and the number of folder files skipped for their extension."""
    shards, num_ignored = [], 0
    for source in cfg.sources:
        source_shards, source_ignored = _source_shards(source, cfg)
        shards.extend(source_shards)
        num_ignored += source_ignored
    return shards, num_ignored


def fingerprint_sources(cfg: IngestConfig) -> str:
    shards, _ = plan_ingest(cfg)
    return sha256_text("\n".join(shard.shard_id for shard in shards))


def _raw_items(shard: ShardInput, max_bytes: int) -> Iterator[RawItem]:
    if shard.kind == "folder":
        return iter_folder_files(list(shard.uris), max_bytes)
    if shard.kind == "tar":
        return iter_tar_images(shard.path, shard.extensions, max_bytes)
    return iter_parquet_images(shard.path, shard.bytes_column, list(shard.row_groups), max_bytes)


def ingest_shard(limits: DecodeLimits, shard: ShardInput) -> ShardResult:
    """Reads and probes every image of one shard. Never raises on a bad image: it becomes a row."""
    images, rejected = [], []
    container = {"folder": "file", "tar": "tar", "parquet": "parquet"}[shard.kind]
    for item in _raw_items(shard, limits.max_bytes):
        common = {"source": shard.source, "role": shard.role, "uri": item.uri}
        if item.data is None:
            detail = item.read_error or "unreadable"
            rejected.append({**common, "image_id": None, "reason": str(item.reason), "detail": detail})
            continue
        image_id = hashlib.sha256(item.data).hexdigest()
        outcome = probe_image(item.data, limits)
        if isinstance(outcome, ProbedImage):
            images.append(
                {
                    **common,
                    "image_id": image_id,
                    "container": container,
                    "byte_offset": item.byte_offset,
                    "byte_size": len(item.data),
                    "width": outcome.width,
                    "height": outcome.height,
                    "format": outcome.format,
                    "mode": outcome.mode,
                    "num_frames": outcome.num_frames,
                }
            )
        else:
            reason = {"reason": str(outcome.reason), "detail": outcome.detail}
            rejected.append({**common, "image_id": image_id, **reason})
    return ShardResult(
        tables={"images": IMAGES.table_from_rows(images), "rejected": REJECTED.table_from_rows(rejected)},
        stats=_shard_stats(shard.source, images, rejected),
    )


def _shard_stats(source: str, images: list[dict], rejected: list[dict]) -> dict[str, Any]:
    by_reason: dict[str, int] = {}
    for row in rejected:
        by_reason[row["reason"]] = by_reason.get(row["reason"], 0) + 1
    return {
        "rows_in": len(images) + len(rejected),
        "images": len(images),
        "rejected": len(rejected),
        "bytes": sum(row["byte_size"] for row in images),
        "rejected_by_reason": by_reason,
        "by_source": {source: {"images": len(images), "rejected": len(rejected)}},
    }


def run_ingest(cfg: IngestConfig, inputs: Mapping[str, Manifest], ctx: StageContext) -> dict[str, Any]:
    del inputs  # ingest reads sources from the config, not from the store
    shards, num_ignored = plan_ingest(cfg)
    limits = DecodeLimits(max_pixels=cfg.max_pixels, min_side=cfg.min_side, max_bytes=cfg.max_bytes)
    stats = ctx.map_shards(functools.partial(ingest_shard, limits), shards)
    if not stats.get("images"):
        named = ", ".join(source.name for source in cfg.sources) or "none configured"
        ctx.warn(f"no images in any source ({named}): every later stage has nothing to work on")
    return {**stats, "shards": len(shards), "files_ignored_by_extension": num_ignored}


INGEST = register_stage(
    StageSpec(
        name="ingest",
        version=1,
        config_type=IngestConfig,
        fn=run_ingest,
        inputs={},
        outputs={"images": IMAGES, "rejected": REJECTED},
        description="decode-check every image of every source",
        shown_stats={
            "rows_in": "files in",
            "images": "images",
            "rejected": "rejected",
            "files_ignored_by_extension": "files ignored by extension",
        },
        fingerprint=fingerprint_sources,
    )
)
