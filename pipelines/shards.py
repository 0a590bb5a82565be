"""Content-keyed shards over the rows of a manifest.

Rows are sorted by their key columns and cut into runs of `rows_per_shard`; a shard's id hashes the
keys it holds. The same rows always give the same shards, whatever the worker count or the order in
which the upstream stage happened to write them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pyarrow as pa

from pipelines.stage import Shard

SHARD_ID_LENGTH = 16
DEFAULT_KEY_COLUMNS = ("image_id", "uri")


def row_shards(
    table: pa.Table, rows_per_shard: int, key_columns: Sequence[str] = DEFAULT_KEY_COLUMNS
) -> list[Shard]:
    """Sorted, content-keyed shards whose payload is the slice of `table` they cover."""
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    ordered = table.sort_by([(column, "ascending") for column in key_columns])
    shards = []
    for start in range(0, ordered.num_rows, rows_per_shard):
        chunk = ordered.slice(start, rows_per_shard)
        keys = zip(*(chunk.column(column).to_pylist() for column in key_columns), strict=True)
        digest = hashlib.sha256("\n".join("|".join(map(str, key)) for key in keys).encode()).hexdigest()
        shards.append(Shard(digest[:SHARD_ID_LENGTH], chunk.combine_chunks()))
    return shards
