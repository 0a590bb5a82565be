"""Rows located in manifest parts: where each row lies, only the rows asked for read, shards as row_shards."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.embed import EMBEDDINGS
from curation.vector_parts import located_columns, located_shards, read_unit_rows
from pipelines.manifest import ManifestError, row_order
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


def test_located_shards_have_row_shards_ids_and_their_own_rows(tmp_path):
    manifest, stored, _ = _write_parts(tmp_path / "m")
    keys, where = located_columns(manifest, EMBEDDINGS, ["image_id", "uri"])
    order = row_order(keys)
    shards = located_shards(keys.take(order), where.take(order), ROWS_PER_SHARD)
    expected = row_shards(keys, ROWS_PER_SHARD, ["image_id", "uri"])
    assert [shard.shard_id for shard in shards] == [shard.shard_id for shard in expected]
    loaded = read_unit_rows(where.take(order))
    with_loaded = located_shards(keys.take(order), where.take(order), ROWS_PER_SHARD, loaded)
    start = 0
    for shard, viewing, reference in zip(shards, with_loaded, expected, strict=True):
        assert shard.payload.keys.equals(reference.payload)
        stop = start + reference.payload.num_rows
        read = shard.payload.unit_rows()
        np.testing.assert_allclose(read, _unit(stored[order[start:stop]]), rtol=1e-6)
        assert viewing.shard_id == shard.shard_id
        assert np.shares_memory(viewing.payload.unit_rows(), loaded)  # a view: nothing read again
        np.testing.assert_array_equal(viewing.payload.unit_rows(), read)
        start = stop
    assert start == len(stored)


def test_a_column_that_is_not_float16_vectors_is_refused(tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    table = pa.table({"image_id": ["a"], "embedding": pa.array([[1.0, 2.0]], pa.list_(pa.float32(), 2))})
    pq.write_table(table, folder / "part-0.parquet")
    _, where = located_columns(Manifest(str(folder), "embeddings", "d", 1), EMBEDDINGS, ["image_id"])
    with pytest.raises(ManifestError, match="float16"):
        read_unit_rows(where)
