"""Key ranges: a manifest walked in row-key order a partition at a time, its rows never held together.

manifest parts (each part's rows sorted by key, parts' key ranges disjoint: how `row_shards` and the
partitioned stages write them)
  --key_ranges: image_id statistics of each part's metadata order the parts; one pass over each part's
    key columns (one part held at a time) checks the order and digests the partitions--> KeyRanges:
    the parts in key order and where each starts (O(parts) memory, nothing per row)
  --KeyRanges.shards(size): runs of `size` rows in key order, cut at the same rows whatever
    the part layout, each a Shard whose id is `row_shards`' id for the same rows (the same sha256 of
    its key lines), whose payload lists the part slices it covers
  --Partition.read(columns): a worker's rows, read from the one or few parts holding them

Global row ids are positions in key order: row i of the manifest is row i - starts[p] of part p. A stage
driver holds per-row arrays indexed by them (labels, a keep mask: a few bytes a row), never keys or URIs.
A manifest whose parts are not key ranges (written by hand, or by another tool) is copied once in key
order beside the stage's outputs (`sorted_copy`: image_id buckets, `pipelines.buckets`, each sorted in
memory), and a warning says so.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.buckets import BUCKETS_DIR, remove_buckets, spill_buckets
from pipelines.manifest import (
    ROW_KEY_COLUMNS,
    ManifestError,
    ManifestSchema,
    align_rows,
    part_name,
    row_order,
    sort_rows,
)
from pipelines.part_rows import PartOffsets, PartRows, manifest_part_paths
from pipelines.shards import SHARD_ID_LENGTH, joined_lines, key_lines
from pipelines.stage import Shard, StageContext

KEY_LINE_END = b"\n"
# Rows a partitioned step's worker reads at once: its key columns, keep-rule columns or one output part.
DEFAULT_ROWS_PER_PARTITION = 1 << 18


class NotKeyRanged(ValueError):
    """The manifest's parts are not disjoint, sorted key ranges (the message says which part)."""


@dataclass(frozen=True, slots=True)
class PartSlice:
    """Rows start..stop-1 of the Parquet part at `path`."""

    path: str
    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class Partition:
    """Global rows first_row..first_row + num_rows - 1, lying in `slices` (in key order)."""

    fs: fsspec.AbstractFileSystem
    first_row: int
    num_rows: int
    slices: tuple[PartSlice, ...]

    def read(self, columns: Sequence[str], schema: ManifestSchema | None = None) -> pa.Table:
        """The partition's `columns`, in key order (typed by `schema` when given); one part at a time."""
        tables = []
        for piece in self.slices:
            table = pq.read_table(piece.path, columns=list(columns), filesystem=self.fs)
            tables.append(table.slice(piece.start, piece.stop - piece.start))
        table = pa.concat_tables(tables).combine_chunks() if tables else None
        if schema is None:
            return table if table is not None else pa.table({name: [] for name in columns})
        fields = [schema.arrow.field(name) for name in columns]
        if table is None:
            return pa.schema(fields).empty_table()
        return table.cast(pa.schema([schema.resolved(table.schema).field(name) for name in columns]))

    @property
    def rows(self) -> slice:
        """The partition's global rows, to index a driver's per-row arrays."""
        return slice(self.first_row, self.first_row + self.num_rows)

    def locate(self, local_rows: np.ndarray) -> PartRows:
        """Where the partition's rows `local_rows` (0 = its first row) lie in its parts."""
        lengths = [piece.stop - piece.start for piece in self.slices]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        local_rows = np.asarray(local_rows, dtype=np.int64)
        piece = np.searchsorted(offsets, local_rows, side="right") - 1
        starts = np.asarray([item.start for item in self.slices], dtype=np.int64)
        rows = starts[piece] + local_rows - offsets[piece] if len(local_rows) else local_rows
        return PartRows(self.fs, tuple(item.path for item in self.slices), piece, rows).take(
            np.arange(len(local_rows))
        )


@dataclass(frozen=True, slots=True)
class KeyRanges:
    """A manifest's parts in key order, their partitions, and each part's first and last key."""

    offsets: PartOffsets
    shards_by_size: Mapping[int, tuple[Shard, ...]]  # rows per partition -> Partition payloads, key order
    first_keys: tuple[tuple[str, str], ...]  # each part's first (image_id, uri)
    last_keys: tuple[tuple[str, str], ...]

    @property
    def num_rows(self) -> int:
        return len(self.offsets)

    def shards(self, rows_per_partition: int) -> tuple[Shard, ...]:
        """Shards of `rows_per_partition` rows (a size `key_ranges` was asked for), Partition payloads."""
        return self.shards_by_size[rows_per_partition]

    def column_is_in(self, column: str, values: Sequence[str]) -> np.ndarray:
        """bool per global row: its `column` is one of `values` (one part's column read at a time)."""
        found = np.zeros(self.num_rows, dtype=bool)
        wanted = pa.array(list(values), pa.string())
        offsets = self.offsets
        for path, start, stop in zip(offsets.parts, offsets.starts[:-1], offsets.starts[1:], strict=True):
            table = pq.read_table(path, columns=[column], filesystem=offsets.fs)
            found[start:stop] = np.asarray(pc.is_in(table.column(column), wanted).combine_chunks())
        return found

    def row_keys(self, rows: np.ndarray) -> list[tuple[str, str]]:
        keys = self.offsets.read_rows(rows, ROW_KEY_COLUMNS)
        return list(zip(keys.column("image_id").to_pylist(), keys.column("uri").to_pylist(), strict=True))

    def check_aligned(self, other: KeyRanges, other_name: str) -> None:
        """ManifestError unless `other` holds this manifest's rows, in its own parts: the same number of
        rows, and each of its parts starting and ending at this manifest's row of the same key."""
        if other.num_rows != self.num_rows or (
            self.num_rows
            and (
                self.row_keys(other.offsets.starts[:-1]) != list(other.first_keys)
                or self.row_keys(other.offsets.starts[1:] - 1) != list(other.last_keys)
            )
        ):
            raise ManifestError(f"{other_name} does not hold the same rows as the images it describes")


def key_ranges(uri: str, *partition_sizes: int) -> KeyRanges:
    """The parts of the manifest at `uri` in key order, cut into partitions of each of `partition_sizes`
    rows (one pass over the keys serves them all).

    Raises:
        NotKeyRanged: a part's rows are not sorted by key, or two parts' key ranges overlap.
    """
    if any(size < 1 for size in partition_sizes):
        raise ValueError(f"partition sizes must be >= 1, got {partition_sizes}")
    fs, paths = manifest_part_paths(uri)
    counted = [(path, pq.ParquetFile(path, filesystem=fs).metadata) for path in paths]
    counted = [(path, metadata) for path, metadata in counted if metadata.num_rows]
    ordered = sorted(counted, key=lambda item: (_smallest_id(item[1]), item[0]))
    walkers = {size: _PartitionWalker(fs, size) for size in partition_sizes}
    firsts, lasts = [], []
    for path, _ in ordered:
        keys = pq.read_table(path, columns=list(ROW_KEY_COLUMNS), filesystem=fs)
        first, last = _check_sorted(path, keys)
        if lasts and not lasts[-1] < first:
            raise NotKeyRanged(
                f"{path}: its keys start at {first}, not after the previous part's {lasts[-1]}"
            )
        firsts.append(first)
        lasts.append(last)
        for walker in walkers.values():
            walker.add_part(path, keys)
    starts = np.concatenate([[0], np.cumsum([metadata.num_rows for _, metadata in ordered])]).astype(np.int64)
    offsets = PartOffsets(fs, tuple(path for path, _ in ordered), starts)
    shards = {size: walker.finish() for size, walker in walkers.items()}
    return KeyRanges(offsets, shards, tuple(firsts), tuple(lasts))


def _smallest_id(metadata: pq.FileMetaData) -> str:
    """The smallest image_id in a part by its row-group statistics ('' when none were written)."""
    column = metadata.schema.to_arrow_schema().get_field_index("image_id")
    found = []
    for group in range(metadata.num_row_groups):
        stats = metadata.row_group(group).column(column).statistics
        if stats is not None and stats.has_min_max:
            found.append(stats.min if isinstance(stats.min, str) else stats.min.decode())
    return min(found, default="")


def _check_sorted(path: str, keys: pa.Table) -> tuple[tuple[str, str], tuple[str, str]]:
    """The part's first and last key; NotKeyRanged unless its rows rise strictly by key."""
    ids = np.asarray(keys.column("image_id").to_numpy(zero_copy_only=False), dtype=object)
    uris = np.asarray(keys.column("uri").to_numpy(zero_copy_only=False), dtype=object)
    same_id = ids[1:] == ids[:-1]
    rising = (ids[1:] > ids[:-1]) | (same_id & (uris[1:] > uris[:-1]))
    if not rising.all():
        row = int(np.flatnonzero(~rising)[0]) + 1
        raise NotKeyRanged(
            f"{path}: row {row} ({ids[row]}, {uris[row]}) does not follow its predecessor by key"
        )
    return (ids[0], uris[0]), (ids[-1], uris[-1])


class _PartitionWalker:
    """Cuts parts, fed in key order, into partitions of `rows_per_partition` rows and digests each one's
    key lines exactly as `row_shards` does, so the same rows get the same shard ids."""

    def __init__(self, fs: fsspec.AbstractFileSystem, rows_per_partition: int) -> None:
        self._fs = fs
        self._size = rows_per_partition
        self._shards: list[Shard] = []
        self._slices: list[PartSlice] = []
        self._digest = hashlib.sha256()
        self._rows = 0
        self._first_row = 0

    def add_part(self, path: str, keys: pa.Table) -> None:
        start = 0
        while start < keys.num_rows:
            take = min(self._size - self._rows, keys.num_rows - start)
            self._feed(path, keys.slice(start, take), start)
            start += take
            if self._rows == self._size:
                self._close()

    def _feed(self, path: str, keys: pa.Table, start: int) -> None:
        if self._rows:
            self._digest.update(KEY_LINE_END)
        self._digest.update(joined_lines(key_lines(keys, ROW_KEY_COLUMNS)))
        self._slices.append(PartSlice(path, start, start + keys.num_rows))
        self._rows += keys.num_rows

    def _close(self) -> None:
        partition = Partition(self._fs, self._first_row, self._rows, tuple(self._slices))
        self._shards.append(Shard(self._digest.hexdigest()[:SHARD_ID_LENGTH], partition))
        self._first_row += self._rows
        self._slices, self._rows, self._digest = [], 0, hashlib.sha256()

    def finish(self) -> tuple[Shard, ...]:
        if self._rows:
            self._close()
        return tuple(self._shards)


SORTED_COPIES_DIR = "_sorted_inputs"
COMPLETE_MARKER = "_COMPLETE"


def stage_key_ranges(
    ctx: StageContext, name: str, uri: str, schema: ManifestSchema, *partition_sizes: int
) -> KeyRanges:
    """`key_ranges` of a stage's input `name`; an input whose parts are not key ranges is first copied
    into the stage's folder in key order (a bucket shuffle: one bucket in memory at a time), with a
    warning that says so."""
    try:
        return key_ranges(uri, *partition_sizes)
    except NotKeyRanged as err:
        ctx.warn(f"input {name} is not in key-ranged parts ({err}); sorting a copy")
    rows_per_part = max(partition_sizes, default=DEFAULT_ROWS_PER_PARTITION)
    return key_ranges(sorted_copy(ctx, name, uri, schema, rows_per_part), *partition_sizes)


def sorted_copy(ctx: StageContext, name: str, uri: str, schema: ManifestSchema, rows_per_part: int) -> str:
    """The manifest at `uri` in key-ranged parts of about `rows_per_part` rows under the stage's folder
    (reused when complete): image_id buckets (`pipelines.buckets`), each sorted; its location."""
    folder = f"{ctx.store.stage_dir(ctx.spec.name, ctx.key)}/{SORTED_COPIES_DIR}/{name}"
    done = f"{folder}/{COMPLETE_MARKER}"
    if not ctx.store.exists(done):
        spill = f"{SORTED_COPIES_DIR}/{name}/{BUCKETS_DIR}"
        for shard in spill_buckets(ctx, uri, rows_per_part, spill):
            ctx.store.write_table_atomic(
                f"{folder}/{part_name(shard.shard_id)}", sort_rows(shard.payload.read(schema))
            )
        remove_buckets(ctx, spill)
        ctx.store.write_bytes_atomic(done, b"")
    return ctx.store.uri_of(folder)


def subset_positions(subset: KeyRanges, superset: KeyRanges, subset_name: str) -> np.ndarray:
    """For each global row of `subset`, the global row of `superset` with the same key (int64, 8 bytes a
    row); a merge of the two key orders, one subset part and the superset parts overlapping it at a time.

    Raises:
        ManifestError: a subset row has no match in `superset`.
    """
    positions = np.empty(subset.num_rows, dtype=np.int64)  # filled in place: no second copy at the end
    offsets = subset.offsets
    for path, start, stop in zip(offsets.parts, offsets.starts[:-1], offsets.starts[1:], strict=True):
        wanted = pq.read_table(path, columns=list(ROW_KEY_COLUMNS), filesystem=offsets.fs)
        positions[start:stop] = _positions_in(superset, wanted, f"{subset_name}: rows of {path}")
    return positions


def key_positions(superset: KeyRanges, keys: pa.Table, name: str) -> np.ndarray:
    """For each row of `keys` (image_id, uri: any order, repeats allowed), the global row of `superset`
    with that key; sorted blocks of the keys each merged with the superset parts they meet.

    Raises:
        ManifestError: a key is not in `superset`.
    """
    order = row_order(keys)
    ordered = keys.select(list(ROW_KEY_COLUMNS)).take(pa.array(order))
    positions = np.empty(keys.num_rows, dtype=np.int64)
    for start in range(0, keys.num_rows, DEFAULT_ROWS_PER_PARTITION):
        block = ordered.slice(start, DEFAULT_ROWS_PER_PARTITION)
        positions[order[start : start + block.num_rows]] = _positions_in(superset, block, name)
    return positions


def _positions_in(superset: KeyRanges, wanted: pa.Table, name: str) -> np.ndarray:
    """Global rows of `superset` holding `wanted`'s keys (in key order), reading only the superset parts
    whose key range meets [first wanted key, last wanted key]."""
    if wanted.num_rows == 0:
        return np.zeros(0, np.int64)
    low = (wanted["image_id"][0].as_py(), wanted["uri"][0].as_py())
    high = (wanted["image_id"][-1].as_py(), wanted["uri"][-1].as_py())
    first = bisect.bisect_left(superset.last_keys, low)
    stop = bisect.bisect_right(superset.first_keys, high)
    offsets = superset.offsets
    found = [
        pq.read_table(offsets.parts[part], columns=list(ROW_KEY_COLUMNS), filesystem=offsets.fs)
        for part in range(first, stop)
    ]
    candidates = pa.concat_tables(found) if found else wanted.schema.empty_table()
    try:
        return (
            offsets.starts[first] + align_rows(wanted, candidates)
            if found
            else align_rows(wanted, candidates)
        )
    except ManifestError as err:
        raise ManifestError(f"{name} are not all in the manifest they refer to: {err}") from None
