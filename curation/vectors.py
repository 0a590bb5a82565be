"""Embedding columns (fixed_size_list<float16>) to matrices and back, read and sharded without copies.

manifest --read_columns (only the named columns)--> table
   --float16_rows: zero-copy [n, dim] float16 view of the column's values
   --unit_rows(rows in key order): one contiguous [n, dim] float32 array of unit rows, a block at a time
   --vector_shards: content-keyed shards (pipelines.shards ids) of RowVectors: keys + a view of that array

No vector passes through Python objects, and the float32 array is the only full-size copy: blocks keep
the temporaries small enough to be reused instead of faulting in fresh pages for each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from pipelines.manifest import PART_SUFFIX, ManifestError, ManifestSchema, embedding_type, resolve_manifest
from pipelines.shards import row_shards
from pipelines.stage import Manifest, Shard

EMBEDDING_COLUMN = "embedding"
# Rows per block of unit_rows: its temporaries (a few MB at any dim) stay in reused heap memory.
BLOCK_ROWS = 8_192


@dataclass(frozen=True, slots=True)
class RowVectors:
    """Rows' keys and their embeddings, row i of `vectors` belonging to row i of `keys`."""

    keys: pa.Table
    vectors: np.ndarray  # [n, dim] float32, unit length


def read_columns(manifest: Manifest, schema: ManifestSchema, columns: Sequence[str]) -> pa.Table:
    """Only `columns` of every part of `manifest`, typed as `schema` types them; the rest is never decoded."""
    fs, location = resolve_manifest(manifest.uri)
    parts = sorted(fs.glob(f"{location.rstrip('/')}/*{PART_SUFFIX}")) if fs.isdir(location) else [location]
    if not parts:
        return schema.empty_table().select(list(columns))
    try:
        table = ds.dataset(parts, format="parquet", filesystem=fs).to_table(columns=list(columns))
        resolved = schema.resolved(table.schema)
        return table.cast(pa.schema([resolved.field(name) for name in columns]))
    except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ManifestError(f"{manifest.uri}: columns {list(columns)} unlike {schema.name}'s: {err}") from err


def float16_rows(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """[n, dim] float16 rows of an embedding column: a view of its values buffer (one chunk: no copy)."""
    values = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = values.type.list_size if pa.types.is_fixed_size_list(values.type) else 0
    if len(values) == 0:
        return np.zeros((0, dim), np.float16)
    return values.flatten().to_numpy().reshape(len(values), dim)


def unit_rows(
    vectors: np.ndarray, rows: np.ndarray | None = None, out: np.ndarray | None = None
) -> np.ndarray:
    """[len(rows), dim] float32 copy of `vectors[rows]` (default: all rows), each re-normalised.

    float16 storage leaves norms a hair off 1. Each row's result is the same whatever the block size.
    With `out` (a float32 array or view of that shape) the rows are written there, with no temporary copy.
    """
    count = len(vectors) if rows is None else len(rows)
    if out is None:
        out = np.empty((count, vectors.shape[1]), np.float32)
    for start in range(0, count, BLOCK_ROWS):
        stop = min(count, start + BLOCK_ROWS)
        block = out[start:stop]
        block[...] = vectors[start:stop] if rows is None else vectors[rows[start:stop]]
        block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), np.finfo(np.float32).tiny)
    return out


def embedding_matrix(table: pa.Table, column: str = EMBEDDING_COLUMN) -> np.ndarray:
    """[n, dim] float32 unit rows of an embedding column."""
    return unit_rows(float16_rows(table.column(column)))


def embedding_array(vectors: np.ndarray) -> pa.Array:
    """A fixed_size_list<float16>[dim] array of `vectors`' rows."""
    dim = vectors.shape[1]
    values = pa.array(np.ascontiguousarray(vectors, dtype=np.float16).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(values, dim).cast(embedding_type(dim))


def vector_shards(keys: pa.Table, vectors: np.ndarray, rows_per_shard: int) -> list[Shard]:
    """`row_shards` of sorted `keys` (the same shard ids), with RowVectors payloads viewing `vectors`.

    Row i of `vectors` belongs to row i of `keys`, which must already be in `row_order` of all its columns.
    """
    shards = []
    start = 0
    # Sorted keys stay put under row_shards' stable sort, so its shards are consecutive runs of rows.
    for shard in row_shards(keys, rows_per_shard, keys.column_names):
        stop = start + shard.payload.num_rows
        shards.append(Shard(shard.shard_id, RowVectors(shard.payload, vectors[start:stop])))
        start = stop
    return shards
