"""row_shards: key-sorted runs whose ids are the SHA-256 of their key lines, whatever the row order,
the chunking or the key column types."""

from __future__ import annotations

import hashlib

import pyarrow as pa

from pipelines.shards import SHARD_ID_LENGTH, row_shards


def _expected_id(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:SHARD_ID_LENGTH]


def test_shard_ids_hash_the_sorted_key_lines():
    table = pa.table({"image_id": ["b", "a", "c", "a"], "uri": ["/x/é.png", "/z.png", None, "/y.png"]})
    shards = row_shards(table, 3)
    assert [shard.shard_id for shard in shards] == [
        _expected_id(["a|/y.png", "a|/z.png", "b|/x/é.png"]),
        _expected_id(["c|None"]),  # a missing key is spelled as str() spells it
    ]
    assert shards[0].payload.column("uri").to_pylist() == ["/y.png", "/z.png", "/x/é.png"]


def test_shard_ids_do_not_depend_on_row_order_or_chunking():
    ids = [f"{row:03d}" for row in range(50)]
    table = pa.table({"image_id": ids, "uri": [f"/pool/{name}.jpg" for name in ids]})
    reversed_chunks = pa.concat_tables([table.slice(25).take(list(range(24, -1, -1))), table.slice(0, 25)])
    first, second = row_shards(table, 7), row_shards(reversed_chunks, 7)
    assert [shard.shard_id for shard in first] == [shard.shard_id for shard in second]
    assert first[1].shard_id == _expected_id([f"{name}|/pool/{name}.jpg" for name in ids[7:14]])


def test_keys_of_other_types_hash_as_python_spells_them():
    table = pa.table({"image_id": ["a", "b"], "row": pa.array([10, 2], pa.int64())})
    (shard,) = row_shards(table, 5, ("image_id", "row"))
    assert shard.shard_id == _expected_id(["a|10", "b|2"])
