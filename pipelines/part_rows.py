"""Where a manifest's rows lie, and reading a few of them by global row id.

PartRows     row i is row `row[i]` of part `parts[part[i]]` (any rows, any order: a sample, a shard's rows)
PartOffsets  parts in key order and where each starts: global row g is row g - starts[p] of part p, with
             nothing held per row (`pipelines.partitions.key_ranges` builds it)
RowSubset    some global rows as rows of their own (8 bytes a row), located per `take`
RowReader    what a picture or a rejected row's match needs: a few rows' columns (PartOffsets, TableRows)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.manifest import PART_SUFFIX, resolve_manifest


@dataclass(frozen=True, slots=True)
class PartRows:
    """Where rows of a manifest lie: row i is row `row[i]` of the Parquet file `parts[part[i]]`."""

    fs: fsspec.AbstractFileSystem
    parts: tuple[str, ...]
    part: np.ndarray  # int64 [n], index into `parts`
    row: np.ndarray  # int64 [n], row inside that part

    def __len__(self) -> int:
        return len(self.row)

    def take(self, positions: np.ndarray) -> PartRows:
        """The rows at `positions`, in that order; `parts` shrinks to the files they use (small pickles)."""
        part = self.part[positions]
        used, part = np.unique(part, return_inverse=True)
        return PartRows(self.fs, tuple(self.parts[index] for index in used), part, self.row[positions])


class RowReader(Protocol):
    """Rows of a manifest by global row id: a few at a time (pictures, rejected rows' matches)."""

    def read_rows(self, rows: np.ndarray, columns: Sequence[str]) -> pa.Table:
        """`columns` of `rows` (any order, repeats allowed), in the order asked."""
        ...


@dataclass(frozen=True, slots=True)
class TableRows:
    """A RowReader over a table already in memory (a stage that holds its rows anyway)."""

    table: pa.Table

    def read_rows(self, rows: np.ndarray, columns: Sequence[str]) -> pa.Table:
        return self.table.select(list(columns)).take(pa.array(np.asarray(rows, dtype=np.int64)))


@dataclass(frozen=True, slots=True)
class PartOffsets:
    """Parts in key order; part p holds global rows starts[p]..starts[p+1]-1. Small: O(parts)."""

    fs: fsspec.AbstractFileSystem
    parts: tuple[str, ...]
    starts: np.ndarray  # int64 [len(parts) + 1]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(part index, row inside that part) of each global row id."""
        rows = np.asarray(rows, dtype=np.int64)
        part = np.searchsorted(self.starts, rows, side="right") - 1
        return part, rows - self.starts[part]

    def take(self, rows: np.ndarray) -> PartRows:
        """Where the global `rows` lie, as `PartRows` naming only the parts they use."""
        part, within = self.locate(rows)
        used, part = np.unique(part, return_inverse=True)
        return PartRows(self.fs, tuple(self.parts[index] for index in used), part.astype(np.int64), within)

    def subset(self, rows: np.ndarray) -> RowSubset:
        """Global `rows` as rows of their own (row i is global row rows[i]), 8 bytes a row."""
        return RowSubset(self, np.asarray(rows, dtype=np.int64))

    def read_rows(self, rows: np.ndarray, columns: Sequence[str]) -> pa.Table:
        """`columns` of the global `rows` (any order, repeats allowed), reading only the parts they lie in."""
        part, within = self.locate(rows)
        order = np.argsort(part, kind="stable")
        pieces, positions = [], []
        for index in np.unique(part).tolist():
            mine = order[part[order] == index]
            table = pq.read_table(self.parts[index], columns=list(columns), filesystem=self.fs)
            pieces.append(table.take(pa.array(within[mine])))
            positions.append(mine)
        if not pieces:  # no rows asked: the columns as the parts type them
            if not self.parts:
                return pa.table({name: pa.array([], pa.string()) for name in columns})
            schema = pq.read_schema(self.parts[0], filesystem=self.fs)
            return pa.schema([schema.field(name) for name in columns]).empty_table()
        back = np.empty(len(part), dtype=np.int64)
        back[np.concatenate(positions)] = np.arange(len(part))
        return pa.concat_tables(pieces).take(pa.array(back))


@dataclass(frozen=True, slots=True)
class RowSubset:
    """Some global rows of `offsets`, as rows 0..n-1 of their own; where they lie is found per `take`."""

    offsets: PartOffsets
    rows: np.ndarray  # int64 global rows

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self.offsets.fs

    @property
    def parts(self) -> tuple[str, ...]:
        return self.offsets.parts

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, positions: np.ndarray) -> PartRows:
        return self.offsets.take(self.rows[positions])


def manifest_part_paths(uri: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    fs, location = resolve_manifest(uri)
    if not fs.isdir(location):
        return fs, [location]
    return fs, sorted(fs.glob(f"{location.rstrip('/')}/*{PART_SUFFIX}"))
