"""Key-range buckets of a manifest in any layout: every row lands in exactly one bucket, all rows of an
image_id together, buckets near their target size, and a killed split resumes at its unmarked parts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import buckets as buckets_module
from pipelines.buckets import bucket_bounds, remove_buckets, spill_buckets
from pipelines.manifest import ManifestSchema
from pipelines.stage import StageContext
from tests.helpers import bare_stage_context

NUM_ROWS = 3000
ROWS_PER_BUCKET = 400
NUM_PARTS = 5
KEYS = ManifestSchema(
    name="keys",
    version=1,
    fields=(pa.field("image_id", pa.string()), pa.field("uri", pa.string()), pa.field("row", pa.int64())),
)


def _shuffled_parts(folder, seed: int = 0) -> pa.Table:
    """Rows with repeated image_ids (hex, as sha256 ids are), shuffled over parts; the table written."""
    rng = np.random.default_rng(seed)
    ids = [f"{value:064x}" for value in rng.integers(0, 2**62, NUM_ROWS // 3)]
    picks = rng.integers(0, len(ids), NUM_ROWS)
    table = pa.table(
        {
            "image_id": [ids[pick] for pick in picks],
            "uri": [f"/pool/{row}.png" for row in range(NUM_ROWS)],
            "row": np.arange(NUM_ROWS),
        }
    )
    folder.mkdir()
    for index, rows in enumerate(np.array_split(rng.permutation(NUM_ROWS), NUM_PARTS)):
        pq.write_table(table.take(rows), folder / f"part-{index}.parquet")
    return table


def _context(tmp_path) -> StageContext:
    return bare_stage_context(tmp_path / "store", "bucket_probe")


def test_buckets_are_image_id_ranges_holding_every_row_once(tmp_path):
    table = _shuffled_parts(tmp_path / "in")
    shards = spill_buckets(_context(tmp_path), str(tmp_path / "in"), ROWS_PER_BUCKET)
    assert len(shards) == len(bucket_bounds(str(tmp_path / "in"), ROWS_PER_BUCKET)) + 1 > 1
    seen, sizes, previous_high = [], [], None
    for shard in shards:
        bucket = shard.payload
        rows = bucket.read(KEYS)
        ids = rows.column("image_id").to_pylist()
        assert bucket.low == previous_high  # consecutive ranges, open at both ends
        assert all(
            (bucket.low is None or bucket.low <= i) and (bucket.high is None or i < bucket.high) for i in ids
        )
        seen += rows.column("row").to_pylist()
        sizes.append(rows.num_rows)
        previous_high = bucket.high
    assert previous_high is None
    assert sorted(seen) == list(range(NUM_ROWS))  # every row once
    assert max(sizes) < 2 * ROWS_PER_BUCKET and min(sizes) > ROWS_PER_BUCKET / 2
    ids_by_bucket = [set(shard.payload.read(KEYS).column("image_id").to_pylist()) for shard in shards]
    assert sum(len(ids) for ids in ids_by_bucket) == len(set(table.column("image_id").to_pylist()))


def test_a_killed_split_resumes_at_the_parts_it_had_not_marked(tmp_path, monkeypatch):
    _shuffled_parts(tmp_path / "in")
    ctx = _context(tmp_path)
    first = spill_buckets(ctx, str(tmp_path / "in"), ROWS_PER_BUCKET)
    before = {shard.shard_id: shard.payload.read(KEYS).sort_by("row") for shard in first}
    markers = sorted((tmp_path / "store" / "bucket_probe" / "k" / "_buckets" / "_split").iterdir())
    markers[0].unlink()
    split = []
    original = buckets_module.split_part
    monkeypatch.setattr(buckets_module, "split_part", lambda *args: split.append(args) or original(*args))
    again = spill_buckets(ctx, str(tmp_path / "in"), ROWS_PER_BUCKET)
    assert len(split) == 1  # only the unmarked part is split again, its pieces rewritten whole
    assert {shard.shard_id: shard.payload.read(KEYS).sort_by("row") for shard in again} == before
    remove_buckets(ctx)
    assert not (tmp_path / "store" / "bucket_probe" / "k" / "_buckets").exists()
