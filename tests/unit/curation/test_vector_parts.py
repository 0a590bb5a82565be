"""Rows located in manifest parts: where each row lies, only the rows asked for read, shards as partitions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.embed import EMBEDDINGS
from curation.vector_parts import located_columns, read_unit_rows, role_rows
from pipelines.manifest import ManifestError
from pipelines.partitions import key_ranges
from pipelines.shards import row_shards
from pipelines.stage import Manifest
from tests.unit.curation.embedding_data import embeddings_table

DIM = 6
PART_SIZES = (7, 1, 12, 5)
ROWS_PER_SHARD = 4


def _write_parts(folder, seed: int = 0) -> tuple[Manifest, np.ndarray, list[str]]:
    """Parts of PART_SIZES rows, keys shuffled across parts; also the stored float16 rows in write order."""
    rng = np.random.default_rng(seed)
    total = sum(PART_SIZES)
    vectors = rng.normal(size=(total, DIM)).astype(np.float32)
    table = embeddings_table(vectors, "pool", "uncurated", "r")
    shuffled = rng.permutation(total)
    table = table.set_column(0, "image_id", pa.array([f"k{row:03d}" for row in shuffled]))
    folder.mkdir()
    start = 0
    for index, size in enumerate(PART_SIZES):
        pq.write_table(table.slice(start, size), folder / f"part-{index}.parquet")
        start += size
    manifest = Manifest(uri=str(folder), schema_name="embeddings", digest="d", num_rows=total)
    return manifest, vectors.astype(np.float16), table.column("image_id").to_pylist()


def _unit(stored: np.ndarray) -> np.ndarray:
    wide = stored.astype(np.float64)
    return wide / np.sqrt((wide**2).sum(axis=1, keepdims=True))


def test_located_columns_give_each_rows_part_and_position(tmp_path):
    manifest, _, ids = _write_parts(tmp_path / "m")
    keys, where = located_columns(manifest, EMBEDDINGS, ["image_id", "uri"])
    assert keys.column("image_id").to_pylist() == ids  # parts in name order, rows in file order
    expected_part = [index for index, size in enumerate(PART_SIZES) for _ in range(size)]
    expected_row = [row for size in PART_SIZES for row in range(size)]
    assert where.part.tolist() == expected_part and where.row.tolist() == expected_row
    assert len(where.parts) == len(PART_SIZES)


def test_read_unit_rows_reads_any_rows_in_the_order_asked(tmp_path):
    manifest, stored, _ = _write_parts(tmp_path / "m")
    _, where = located_columns(manifest, EMBEDDINGS, ["image_id"])
    positions = np.array([20, 3, 7, 3, 0, 24])  # across parts, repeated, unsorted
    picked = where.take(positions)
    assert picked.part.max() < len(picked.parts) <= len(PART_SIZES)
    got = read_unit_rows(picked)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _unit(stored[positions]), rtol=1e-6)
    one_part = where.take(np.array([8, 9]))  # both rows in the third part
    assert one_part.parts == (where.parts[2],) and one_part.part.tolist() == [0, 0]


def test_role_shards_are_the_partitions_with_their_role_rows(tmp_path):
    """Key-ranged parts (named out of key order), some rows of another role: each shard is a partition
    (row_shards' id over every row) holding its rows of the role, read or viewed from the loaded rows."""
    rng = np.random.default_rng(3)
    total = sum(PART_SIZES)
    vectors = rng.normal(size=(total, DIM)).astype(np.float32)
    table = embeddings_table(vectors, "pool", "uncurated", "r")
    roles = np.where(rng.random(total) < 0.3, "curated", "uncurated")
    table = table.set_column(table.column_names.index("role"), "role", pa.array(roles.tolist()))
    table = table.set_column(0, "image_id", pa.array([f"k{row:03d}" for row in range(total)]))
    folder = tmp_path / "m"
    folder.mkdir()
    start = 0
    for name, size in zip(rng.permutation(len(PART_SIZES)), PART_SIZES, strict=True):
        pq.write_table(table.slice(start, size), folder / f"part-{name}.parquet")
        start += size
    pool = role_rows(key_ranges(str(folder), ROWS_PER_SHARD), ["uncurated"])
    np.testing.assert_array_equal(pool.rows, np.flatnonzero(roles == "uncurated"))
    shards = pool.shards(ROWS_PER_SHARD)
    expected = {shard.shard_id: shard.payload for shard in row_shards(table, ROWS_PER_SHARD)}
    assert {shard.shard_id for shard in shards} <= set(expected)
    loaded = pool.read_unit_rows(np.arange(len(pool)))
    np.testing.assert_allclose(loaded, _unit(vectors.astype(np.float16)[pool.rows]), rtol=1e-6)
    seen = 0
    for shard, viewing in zip(shards, pool.shards(ROWS_PER_SHARD, loaded), strict=True):
        reference = expected[shard.shard_id].filter(
            pa.array(np.asarray(expected[shard.shard_id]["role"]) == "uncurated")
        )
        assert shard.payload.read_keys().equals(reference.select(["image_id", "uri"]))
        count = reference.num_rows
        np.testing.assert_array_equal(shard.payload.unit_rows(), loaded[seen : seen + count])
        assert viewing.shard_id == shard.shard_id
        assert np.shares_memory(viewing.payload.unit_rows(), loaded)  # a view: nothing read again
        seen += count
    assert seen == len(pool)


def test_a_column_that_is_not_float16_vectors_is_refused(tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    table = pa.table({"image_id": ["a"], "embedding": pa.array([[1.0, 2.0]], pa.list_(pa.float32(), 2))})
    pq.write_table(table, folder / "part-0.parquet")
    _, where = located_columns(Manifest(str(folder), "embeddings", "d", 1), EMBEDDINGS, ["image_id"])
    with pytest.raises(ManifestError, match="float16"):
        read_unit_rows(where)
