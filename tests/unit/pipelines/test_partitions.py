"""Key ranges: parts walked in key order whatever their names, partitions with row_shards' ids and rows,
rows read by global id, subsets located by a key merge, and manifests that are not key ranges refused
(or, in a stage, sorted once with a warning)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.manifest import ManifestError, ManifestSchema
from pipelines.partitions import NotKeyRanged, key_ranges, stage_key_ranges, subset_positions
from pipelines.shards import row_shards
from tests.helpers import bare_stage_context

NUM_ROWS = 23
PART_SIZES = (5, 1, 9, 8)  # uneven, so partitions cross part boundaries


def _keys(rows: np.ndarray) -> pa.Table:
    ids = [f"{row // 2:03d}" for row in rows]  # pairs of rows share an image_id: the uri breaks the tie
    return pa.table({"image_id": ids, "uri": [f"/pool/{row:03d}.png" for row in rows], "row": rows})


def _write(folder, table: pa.Table, sizes, seed: int = 0) -> str:
    """`table` (in key order) as parts of `sizes` rows, named in a shuffled order."""
    folder.mkdir()
    names = np.random.default_rng(seed).permutation(len(sizes))
    start = 0
    for name, size in zip(names, sizes, strict=True):
        pq.write_table(table.slice(start, size), folder / f"part-{name}.parquet")
        start += size
    return str(folder)


def test_partitions_have_row_shards_ids_and_rows_whatever_the_part_layout(tmp_path):
    table = _keys(np.arange(NUM_ROWS))
    ranges = key_ranges(_write(tmp_path / "m", table, PART_SIZES), 4, 7)
    other = key_ranges(_write(tmp_path / "n", table, (12, 11), seed=1), 4, 7)
    assert ranges.num_rows == NUM_ROWS and list(ranges.offsets.starts) == [0, 5, 6, 15, 23]
    for size in (4, 7):
        expected = row_shards(table, size)
        shards = ranges.shards(size)
        assert [shard.shard_id for shard in shards] == [shard.shard_id for shard in expected]
        assert [shard.shard_id for shard in other.shards(size)] == [shard.shard_id for shard in expected]
        for shard, reference in zip(shards, expected, strict=True):
            partition = shard.payload
            assert partition.read(["row"]).column("row").to_pylist() == reference.payload["row"].to_pylist()
            assert table.slice(partition.first_row, partition.num_rows)["row"].equals(
                reference.payload["row"]
            )


def test_rows_are_read_by_global_id_in_the_order_asked(tmp_path):
    ranges = key_ranges(_write(tmp_path / "m", _keys(np.arange(NUM_ROWS)), PART_SIZES))
    rows = np.array([22, 0, 5, 5, 14, 6])  # across parts, repeated, unsorted
    assert ranges.offsets.read_rows(rows, ["row"]).column("row").to_pylist() == rows.tolist()
    located = ranges.offsets.take(np.array([7, 8]))  # both in the part of 9 rows
    assert len(located.parts) == 1 and located.row.tolist() == [1, 2]
    assert ranges.column_is_in("uri", ["/pool/003.png", "/pool/020.png"]).nonzero()[0].tolist() == [3, 20]


def test_a_subset_finds_its_rows_through_the_key_merge(tmp_path):
    table = _keys(np.arange(NUM_ROWS))
    whole = key_ranges(_write(tmp_path / "whole", table, PART_SIZES))
    chosen = np.array([0, 2, 3, 9, 15, 16, 22])
    subset = key_ranges(_write(tmp_path / "subset", table.take(chosen), (3, 4)))
    np.testing.assert_array_equal(subset_positions(subset, whole, "subset"), chosen)
    whole.check_aligned(key_ranges(_write(tmp_path / "again", table, (20, 3))), "again")
    with pytest.raises(ManifestError, match="not all in"):
        subset_positions(whole, subset, "whole")
    with pytest.raises(ManifestError, match="same rows"):
        whole.check_aligned(subset, "subset")


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("unsorted part", "does not follow its predecessor"),
        ("overlapping parts", "not after the previous part"),
    ],
)
def test_parts_that_are_not_key_ranges_are_refused(tmp_path, layout, message):
    table = _keys(np.arange(NUM_ROWS))
    folder = tmp_path / "m"
    folder.mkdir()
    if layout == "unsorted part":
        pq.write_table(table.take(np.arange(NUM_ROWS)[::-1]), folder / "part-0.parquet")
    else:
        pq.write_table(table.take(np.arange(0, NUM_ROWS, 2)), folder / "part-0.parquet")
        pq.write_table(table.take(np.arange(1, NUM_ROWS, 2)), folder / "part-1.parquet")
    with pytest.raises(NotKeyRanged, match=message):
        key_ranges(str(folder), 4)


KEYS = ManifestSchema(
    name="keys",
    version=1,
    fields=(pa.field("image_id", pa.string()), pa.field("uri", pa.string()), pa.field("row", pa.int64())),
)


def test_a_stage_sorts_an_input_that_is_not_key_ranged_once_and_says_so(tmp_path):
    rows = np.random.default_rng(2).permutation(NUM_ROWS)
    table = _keys(rows)
    folder = tmp_path / "shuffled"
    folder.mkdir()
    pq.write_table(table, folder / "part-0.parquet")
    ctx = bare_stage_context(tmp_path / "store", "probe")
    ranges = stage_key_ranges(ctx, "images", str(folder), KEYS, 4)
    assert len(ctx.warnings) == 1 and "not in key-ranged parts" in ctx.warnings[0]
    assert [shard.shard_id for shard in ranges.shards(4)] == [
        shard.shard_id for shard in row_shards(table, 4)
    ]
    assert ranges.offsets.read_rows(np.arange(NUM_ROWS), ["row"]).column("row").to_pylist() == sorted(rows)
