"""The keep rule a partition at a time gives what the rule gives on the whole table, for any partition
size and any keep rule; the partitioned outputs hold exactly the kept rows and the rejected rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.dedup.components import (
    DUPLICATES_REJECTED,
    KeepRuleConfig,
    connected_components,
    duplicate_rejections,
    resolve_groups,
)
from curation.dedup.keep import Dropped, resolve_partitioned, write_partitioned
from pipelines.executor import SerialExecutor
from pipelines.manifest import IMAGES, read_manifest, sort_rows
from pipelines.partitions import key_ranges
from tests.helpers import bare_stage_context

NUM_ROWS = 240
PART_SIZES = (50, 3, 97, 90)
PARTITION_SIZES = (7, 64, NUM_ROWS)
ROLES = np.array(["uncurated", "curated", "eval"])
ROLE_SHARES = (0.7, 0.2, 0.1)
NUM_EDGES = 150
REASON = "test_duplicate"
RULES = (
    KeepRuleConfig(),
    KeepRuleConfig(role_priority=("uncurated", "eval", "curated"), protected_roles=(), prefer_larger=False),
)


def _images(seed: int) -> pa.Table:
    """Rows in key order; few distinct sizes and resolutions, so the URI tie-break decides often."""
    rng = np.random.default_rng(seed)
    side = rng.choice([32, 64], NUM_ROWS)
    return IMAGES.table_from_rows(
        [
            {
                "image_id": f"{row:064x}",
                "source": "s",
                "role": str(rng.choice(ROLES, p=ROLE_SHARES)),
                "uri": f"/data/{rng.integers(0, 1000):04d}-{row}.png",  # URI order is not key order
                "container": "file",
                "byte_offset": None,
                "byte_size": int(rng.choice([100, 200])),
                "width": int(side[row]),
                "height": int(side[row]),
                "format": "PNG",
                "mode": "RGB",
                "num_frames": 1,
            }
            for row in range(NUM_ROWS)
        ]
    )


def _labels(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return connected_components(
        NUM_ROWS, rng.integers(0, NUM_ROWS, NUM_EDGES), rng.integers(0, NUM_ROWS, NUM_EDGES)
    )


@pytest.fixture
def stored(tmp_path):
    images = _images(seed=4)
    folder = tmp_path / "images"
    folder.mkdir()
    start = 0
    for name, size in zip((3, 0, 2, 1), PART_SIZES, strict=True):  # names out of key order
        pq.write_table(images.slice(start, size), folder / f"part-{name}.parquet")
        start += size
    return images, key_ranges(str(folder), *PARTITION_SIZES)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("rows_per_partition", PARTITION_SIZES)
def test_partitioned_rule_equals_the_whole_table_rule(stored, rule, rows_per_partition):
    images, ranges = stored
    labels = _labels(seed=9)
    expected = resolve_groups(images, labels, rule)
    found = resolve_partitioned(ranges, rows_per_partition, labels, rule, SerialExecutor())
    assert 0 < (~expected.keep).sum() < NUM_ROWS  # groups with rows to drop
    np.testing.assert_array_equal(found.keep, expected.keep)
    np.testing.assert_array_equal(found.representative, expected.representative)
    np.testing.assert_array_equal(found.match, expected.match)


def test_partitioned_outputs_hold_the_kept_and_the_rejected_rows(stored, tmp_path):
    images, ranges = stored
    labels = _labels(seed=9)
    resolution = resolve_groups(images, labels, KeepRuleConfig())
    dropped = np.flatnonzero(~resolution.keep)
    similarity = np.linspace(0.5, 1.0, len(dropped)).astype(np.float32)
    group = resolution.representative[dropped]
    outputs = {"images": IMAGES, "rejected": DUPLICATES_REJECTED}
    ctx = bare_stage_context(tmp_path / "store", "keep_probe", outputs)
    decided = Dropped(resolution.keep, resolution.match[dropped], group, similarity)
    write_partitioned(ctx, ranges, PARTITION_SIZES[0], decided, REASON)
    parts = ctx.store.list_parts(ctx.store.output_dir("keep_probe", "k", "images"))
    assert len(parts) == len(ranges.shards(PARTITION_SIZES[0]))  # one part per partition
    kept = read_manifest(ctx.output_uri("images"), IMAGES)
    assert sort_rows(kept).equals(images.filter(resolution.keep))
    rejected = read_manifest(ctx.output_uri("rejected"), DUPLICATES_REJECTED)
    expected = duplicate_rejections(images, dropped, resolution.match[dropped], group, similarity, REASON)
    assert sort_rows(rejected).equals(sort_rows(expected))
