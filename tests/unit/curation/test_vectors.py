"""Embedding columns: zero-copy float16 views, unit rows by blocks, column-only reads, shards keyed like
row_shards."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.embed import EMBEDDINGS
from curation.vectors import (
    BLOCK_ROWS,
    embedding_array,
    float16_rows,
    read_columns,
    unit_rows,
    vector_shards,
)
from pipelines.manifest import ManifestError, row_order
from pipelines.shards import row_shards
from pipelines.stage import Manifest
from pipelines.store import Store
from tests.unit.curation.embedding_data import embeddings_table, write_manifest

DIM = 8
NUM_ROWS = 23
ROWS_PER_SHARD = 5
FLOAT16_BYTES = 2


def _vectors(seed: int = 0, num_rows: int = NUM_ROWS) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(num_rows, DIM)).astype(np.float32)


def test_float16_rows_is_a_view_of_the_arrow_values():
    column = embedding_array(_vectors()).slice(3, 10)  # a slice: the view must honour the offset
    rows = float16_rows(column)
    assert rows.shape == (10, DIM) and rows.dtype == np.float16
    expected = np.array(column.to_pylist(), dtype=np.float16)
    np.testing.assert_array_equal(rows, expected)
    values_start = column.values.buffers()[1].address + (column.offset * DIM) * FLOAT16_BYTES
    assert rows.__array_interface__["data"][0] == values_start
    assert float16_rows(pa.chunked_array([column[:4], column[4:]])).tolist() == expected.tolist()
    assert float16_rows(embedding_array(np.zeros((0, DIM)))).shape == (0, DIM)


def test_unit_rows_are_the_float32_rows_over_their_norms():
    stored = _vectors().astype(np.float16)
    expected = np.array(
        [row / np.sqrt(sum(value**2 for value in row)) for row in stored.astype(np.float64).tolist()]
    )
    np.testing.assert_allclose(unit_rows(stored), expected, rtol=1e-6)
    assert unit_rows(stored).dtype == np.float32
    picked = np.array([5, 0, 5, 22])
    np.testing.assert_array_equal(unit_rows(stored, picked), unit_rows(stored)[picked])
    assert np.all(unit_rows(np.zeros((2, DIM), np.float16)) == 0)  # no division by zero


def test_unit_rows_do_not_depend_on_the_block_boundaries():
    stored = _vectors(seed=3, num_rows=BLOCK_ROWS + 7).astype(np.float16)
    whole = stored.astype(np.float32)
    whole /= np.linalg.norm(whole, axis=1, keepdims=True)
    np.testing.assert_array_equal(unit_rows(stored), whole)  # bit for bit, across the block edge


def test_vector_shards_match_row_shards_and_carry_each_rows_vector():
    vectors = _vectors(seed=1)
    table = embeddings_table(vectors, "pool", "uncurated", "p")
    by_id = dict(zip(table.column("image_id").to_pylist(), vectors, strict=True))
    table = table.take(np.random.default_rng(2).permutation(NUM_ROWS))  # parts arrive in any order
    keys = table.select(["image_id", "uri"])
    order = row_order(keys)
    assert keys.take(order).column("image_id").to_pylist() == sorted(by_id)
    stored = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    unit = stored / np.linalg.norm(stored, axis=1, keepdims=True)
    shards = vector_shards(keys.take(order), unit[order], ROWS_PER_SHARD)
    reference = row_shards(table, ROWS_PER_SHARD, ("image_id", "uri"))
    assert [shard.shard_id for shard in shards] == [shard.shard_id for shard in reference]
    for shard, expected in zip(shards, reference, strict=True):
        ids = shard.payload.keys.column("image_id").to_pylist()
        assert ids == expected.payload.column("image_id").to_pylist()
        expected_rows = np.stack([by_id[name] for name in ids]).astype(np.float16).astype(np.float32)
        np.testing.assert_allclose(
            shard.payload.vectors, expected_rows / np.linalg.norm(expected_rows, axis=1, keepdims=True)
        )


def test_read_columns_decodes_only_the_named_columns(tmp_path):
    table = embeddings_table(_vectors(), "pool", "uncurated", "p")
    manifest = write_manifest(tmp_path, "embeddings", EMBEDDINGS, table)
    read = read_columns(manifest, EMBEDDINGS, ["uri", "embedding"])
    assert read.column_names == ["uri", "embedding"]
    assert read.schema.field("embedding").type == pa.list_(pa.float16(), DIM)
    assert read.column("uri").to_pylist() == table.column("uri").to_pylist()
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    empty = Manifest(uri=str(empty_dir), schema_name="embeddings", digest="none", num_rows=0)
    assert read_columns(empty, EMBEDDINGS, ["uri"]).num_rows == 0
    with pytest.raises(ManifestError, match="embeddings"):
        read_columns(manifest, EMBEDDINGS, ["no_such_column"])


def test_the_store_writes_embeddings_without_a_dictionary(tmp_path):
    store = Store(tmp_path)
    path = f"{store.root}/part-x.parquet"
    store.write_table_atomic(path, embeddings_table(_vectors(), "pool", "uncurated", "p"))
    row_group = pq.ParquetFile(path).metadata.row_group(0)
    encodings = {
        row_group.column(i).path_in_schema.split(".")[0]: row_group.column(i).encodings
        for i in range(row_group.num_columns)
    }
    # Why it matters: dictionary-encoded float16 decodes about 4x slower and compresses no smaller.
    assert "RLE_DICTIONARY" not in encodings["embedding"]
    assert "RLE_DICTIONARY" in encodings["source"]
