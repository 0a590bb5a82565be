"""Embedding rows read where they lie: a few rows at a time, never the whole embedding column at once.

manifest --located_columns: small columns of every part (keys, role; not the embeddings)
            + PartRows: for each row, its part and its row inside that part
   --PartRows.take(positions): any subset, in any order (a training sample, one shard's rows)
   --read_unit_rows: those rows' embeddings only, part by part --> [n, dim] unit float32, in take order
   --RoleRows.shards: a key-ranged manifest's partitions (`pipelines.partitions`), each with the rows of
     some roles in it (ChosenRows: read by the worker, or views of rows the caller already holds)
   --StoredVectors: PartRows as a `knn.VectorSource`, so a Faiss index fills a block at a time

Memory is the small columns plus the rows asked for (and, while reading, one part per reading thread): a
shard worker reads its rows from the one or two parts holding them (upstream stages write key-sorted
content shards, so key-ordered rows cluster in parts).
The unit rows are computed exactly as `unit_rows` computes them from the whole column, row by row.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.vectors import EMBEDDING_COLUMN, float16_rows, unit_rows
from pipelines.manifest import PART_SUFFIX, ROW_KEY_COLUMNS, ManifestError, ManifestSchema, resolve_manifest
from pipelines.part_rows import PartRows
from pipelines.partitions import KeyRanges, Partition
from pipelines.stage import Manifest, Shard


def manifest_parts(manifest: Manifest | str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The file system and the sorted Parquet parts of `manifest` (or of the folder or file at a URI)."""
    fs, location = resolve_manifest(manifest if isinstance(manifest, str) else manifest.uri)
    if not fs.isdir(location):
        return fs, [location]
    return fs, sorted(fs.glob(f"{location.rstrip('/')}/*{PART_SUFFIX}"))


def located_columns(
    manifest: Manifest | str, schema: ManifestSchema, columns: Sequence[str]
) -> tuple[pa.Table, PartRows]:
    """`columns` of every row (typed as `schema` types them), and where each row lies; parts in name order."""
    fs, parts = manifest_parts(manifest)
    tables = []
    for path in parts:
        try:
            table = pq.read_table(path, columns=list(columns), filesystem=fs)
            tables.append(
                table.cast(pa.schema([schema.resolved(table.schema).field(name) for name in columns]))
            )
        except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise ManifestError(f"{path}: columns {list(columns)} unlike {schema.name}'s: {err}") from err
    if not tables:
        nowhere = np.zeros(0, np.int64)
        return schema.empty_table().select(list(columns)), PartRows(fs, (), nowhere, nowhere)
    counts = [table.num_rows for table in tables]
    part = np.repeat(np.arange(len(parts), dtype=np.int64), counts)
    row = np.concatenate([np.arange(count, dtype=np.int64) for count in counts])
    return pa.concat_tables(tables), PartRows(fs, tuple(parts), part, row)


def read_unit_rows(where: PartRows, column: str = EMBEDDING_COLUMN) -> np.ndarray:
    """[len(where), dim] unit float32 rows of the `column` embeddings at `where`, each part read once.

    Parts are read and converted on parallel threads (Parquet decoding and numpy release the GIL), each
    writing its own rows of the result; at most one part per thread is held at a time.
    """
    if not where.parts:
        return np.zeros((0, 0), np.float32)
    out = np.empty((len(where), _list_size(where, where.parts[0], column)), np.float32)

    def fill(index: int) -> None:
        path = where.parts[index]
        values = pq.read_table(path, columns=[column], filesystem=where.fs).column(column)
        if _list_size(where, path, column, values.type) != out.shape[1]:
            raise ManifestError(f"{path}: {column} is {values.type}, unlike the first part's {out.shape[1]}")
        mine = _as_slice(np.flatnonzero(where.part == index))
        rows = _as_slice(where.row[mine])
        stored = float16_rows(values)
        # Runs of rows (the usual case: key-sorted shards of key-sorted parts) are written in place, without
        # a gather or a temporary copy.
        if isinstance(mine, slice) and isinstance(rows, slice):
            unit_rows(stored[rows], out=out[mine])
        else:
            out[mine] = unit_rows(stored[rows]) if isinstance(rows, slice) else unit_rows(stored, rows)

    with ThreadPoolExecutor(max_workers=min(len(where.parts), os.cpu_count() or 1)) as threads:
        list(threads.map(fill, range(len(where.parts))))
    return out


def _list_size(where: PartRows, path: str, column: str, value_type: pa.DataType | None = None) -> int:
    """The width of `column` in the part at `path` (its schema is read unless `value_type` is given);
    a column that is not fixed_size_list<float16> is a ManifestError."""
    if value_type is None:
        value_type = pq.read_schema(path, filesystem=where.fs).field(column).type
    if not (pa.types.is_fixed_size_list(value_type) and value_type.value_type == pa.float16()):
        raise ManifestError(f"{path}: {column} is {value_type}, not fixed_size_list<float16>")
    return value_type.list_size


def _as_slice(positions: np.ndarray) -> np.ndarray | slice:
    """`positions` as a slice when they are one ascending run, else unchanged."""
    if (
        len(positions)
        and positions[-1] - positions[0] + 1 == len(positions)
        and np.all(np.diff(positions) == 1)
    ):
        return slice(int(positions[0]), int(positions[-1]) + 1)
    return positions


@dataclass(frozen=True, slots=True)
class StoredVectors:
    """A `curation.dedup.knn.VectorSource` over stored rows: row i is row i of `where`, column `column`."""

    where: PartRows
    column: str
    dim: int

    def __len__(self) -> int:
        return len(self.where)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.read_rows(np.arange(start, stop))

    def read_rows(self, positions: np.ndarray) -> np.ndarray:
        rows = read_unit_rows(self.where.take(positions), self.column)
        return rows if len(rows) else np.zeros((0, self.dim), np.float32)

    def part(self, start: int, stop: int) -> StoredVectors:
        return self.take(np.arange(start, stop))

    def take(self, positions: np.ndarray) -> StoredVectors:
        """The rows at `positions`, in that order, as a source of their own."""
        return StoredVectors(self.where.take(positions), self.column, self.dim)


def stored_vectors(where: PartRows, column: str) -> StoredVectors:
    """`where`'s rows of the fixed-size-list `column`, its width read from the first part's schema."""
    dim = 0
    if where.parts:
        field = pq.read_schema(where.parts[0], filesystem=where.fs).field(column)
        dim = field.type.list_size if pa.types.is_fixed_size_list(field.type) else 0
    return StoredVectors(where, column, dim)


@dataclass(frozen=True, slots=True)
class ChosenRows:
    """A shard: the rows of one partition a stage works on (e.g. those of its roles), and their unit
    vectors when the driver holds them already."""

    partition: Partition
    chosen: np.ndarray  # int64 rows of the partition (0 = its first), ascending
    loaded: np.ndarray | None = None  # [len(chosen), dim] unit float32

    def read_keys(self) -> pa.Table:
        """The chosen rows' (image_id, uri), in key order."""
        return self.partition.read(ROW_KEY_COLUMNS).take(pa.array(self.chosen))

    def unit_rows(self) -> np.ndarray:
        """The chosen rows' unit float32 embeddings: the loaded ones, else read from their parts."""
        return self.loaded if self.loaded is not None else read_unit_rows(self.partition.locate(self.chosen))


@dataclass(frozen=True, slots=True)
class RoleRows:
    """The rows of some roles in a key-ranged embeddings manifest: their global ids, 8 bytes a row."""

    ranges: KeyRanges
    rows: np.ndarray  # int64 global rows, ascending (key order)

    def __len__(self) -> int:
        return len(self.rows)

    def read_unit_rows(self, positions: np.ndarray) -> np.ndarray:
        """Unit float32 embeddings of the role rows at sorted `positions` (e.g. a seeded sample)."""
        return read_unit_rows(self.ranges.offsets.take(self.rows[positions]))

    def shards(self, rows_per_shard: int, loaded: np.ndarray | None = None) -> list[Shard]:
        """One shard per partition of `rows_per_shard` rows holding any role row (the partition's id);
        with `loaded` (unit rows of every role row, in order) the shards view it instead of reading."""
        shards = []
        for shard in self.ranges.shards(rows_per_shard):
            partition = shard.payload
            low, high = np.searchsorted(
                self.rows, [partition.first_row, partition.first_row + partition.num_rows]
            )
            if high > low:
                chosen = self.rows[low:high] - partition.first_row
                rows = ChosenRows(partition, chosen, None if loaded is None else loaded[low:high])
                shards.append(Shard(shard.shard_id, rows))
        return shards


def role_rows(ranges: KeyRanges, roles: Sequence[str]) -> RoleRows:
    """The rows of `roles` in the manifest of `ranges` (its role column read one part at a time)."""
    return RoleRows(ranges, np.flatnonzero(ranges.column_is_in("role", roles)))
