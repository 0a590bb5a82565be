"""Key-range buckets of a manifest in any layout: a shuffle that never holds the manifest's rows.

input parts (any order: e.g. ingest's, one per file shard)
  --bucket_bounds: every SAMPLE_STRIDE-th image_id of each part (its image_id column read one part at a
    time), sorted --> the image_id bounds of buckets of about `rows_per_bucket` rows (any id alphabet)
  --spill_buckets, a map over the input parts (executor): each worker splits its part's rows by those
    bounds; the driver writes each piece under the stage's folder, then a marker per input part (a
    killed run resumes at the unmarked parts)
  --> Bucket shards (id from their bounds), each reading its pieces: every row of an image_id range, so
      a group-by on image_id (exact dedup) is complete inside one bucket, and the buckets are key ranges

Driver memory: the sample (rows / SAMPLE_STRIDE ids) and one part's pieces at a time.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.manifest import ManifestSchema, part_name, shard_id_of
from pipelines.part_rows import manifest_part_paths
from pipelines.shards import SHARD_ID_LENGTH
from pipelines.stage import Shard, StageContext

# Sampled ids per bucket: quantiles of 64 samples put each bucket within about 1/8 of its target size.
SAMPLES_PER_BUCKET = 64
BUCKETS_DIR = "_buckets"
SPLIT_MARKERS_DIR = "_split"
KEY_COLUMN = "image_id"


@dataclass(frozen=True, slots=True)
class Bucket:
    """The rows with image_id in [low, high) (None: open), in the pieces under `folder`."""

    fs: fsspec.AbstractFileSystem
    folder: str
    low: str | None
    high: str | None

    def read(self, schema: ManifestSchema) -> pa.Table:
        """Every row of the bucket (in no particular order), typed by `schema`."""
        if not self.fs.isdir(self.folder):
            return schema.empty_table()
        pieces = sorted(self.fs.glob(f"{self.folder}/*.parquet"))
        return schema.validate(pa.concat_tables([pq.read_table(path, filesystem=self.fs) for path in pieces]))


def bucket_bounds(uri: str, rows_per_bucket: int) -> list[str]:
    """The image_id bounds splitting the manifest at `uri` into buckets of about `rows_per_bucket` rows."""
    fs, parts = manifest_part_paths(uri)
    stride = max(1, rows_per_bucket // SAMPLES_PER_BUCKET)
    sample, total = [], 0
    for path in parts:
        ids = pq.read_table(path, columns=[KEY_COLUMN], filesystem=fs).column(KEY_COLUMN)
        sample += ids.to_pylist()[::stride]
        total += len(ids)
    sample.sort()
    buckets = -(-total // rows_per_bucket)  # ceil
    quantiles = [sample[len(sample) * index // buckets] for index in range(1, buckets)]
    return sorted(set(quantiles))


def split_part(bounds: list[str], path_and_fs: tuple[str, fsspec.AbstractFileSystem]) -> dict[int, pa.Table]:
    """Worker: one input part's rows by bucket (bucket index -> its rows)."""
    path, fs = path_and_fs
    table = pq.read_table(path, filesystem=fs)
    ids = np.asarray(table.column(KEY_COLUMN).to_pylist(), dtype=object)
    bucket = np.searchsorted(np.asarray(bounds, dtype=object), ids, side="right")
    return {int(index): table.filter(pa.array(bucket == index)) for index in np.unique(bucket)}


def spill_buckets(
    ctx: StageContext, uri: str, rows_per_bucket: int, folder: str = BUCKETS_DIR
) -> list[Shard]:
    """The manifest at `uri` split into key-range buckets under `folder` of this run's stage folder; one
    Shard per bucket."""
    fs, parts = manifest_part_paths(uri)
    bounds = bucket_bounds(uri, rows_per_bucket)
    root = f"{ctx.store.stage_dir(ctx.spec.name, ctx.key)}/{folder}"
    marker = functools.partial(_marker, root)
    todo = [path for path in parts if not ctx.store.exists(marker(path))]
    worker = functools.partial(split_part, bounds)
    for index, pieces in ctx.executor.map_unordered(worker, [(path, fs) for path in todo]):
        stem = _stem(todo[index])
        for bucket, table in pieces.items():
            ctx.store.write_table_atomic(f"{_bucket_folder(root, bucket)}/{part_name(stem)}", table)
        ctx.store.write_bytes_atomic(marker(todo[index]), b"")
    edges = [None, *bounds, None]
    return [
        Shard(_bucket_id(low, high), Bucket(ctx.store.fs, _bucket_folder(root, index), low, high))
        for index, (low, high) in enumerate(itertools.pairwise(edges))
    ]


def remove_buckets(ctx: StageContext, folder: str = BUCKETS_DIR) -> None:
    """Drops the pieces once the buckets' outputs are written (a rerun would spill again)."""
    root = f"{ctx.store.stage_dir(ctx.spec.name, ctx.key)}/{folder}"
    if ctx.store.fs.isdir(root):
        ctx.store.fs.rm(root, recursive=True)


def _stem(path: str) -> str:
    """The input part's shard id (its file name without `part-` and `.parquet`): unique in its manifest."""
    return shard_id_of(path.rsplit("/", 1)[-1])


def _marker(root: str, path: str) -> str:
    return f"{root}/{SPLIT_MARKERS_DIR}/{_stem(path)}.done"


def _bucket_folder(root: str, bucket: int) -> str:
    return f"{root}/{bucket:06d}"


def _bucket_id(low: str | None, high: str | None) -> str:
    """A bucket's shard id: its bounds, which come from the input's content."""
    return hashlib.sha256(f"{low}\n{high}".encode()).hexdigest()[:SHARD_ID_LENGTH]
