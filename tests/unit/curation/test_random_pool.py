"""random_pool_rows: uniform, without replacement, uncurated rows only, seeded, order-independent."""

from __future__ import annotations

import numpy as np
import pytest

from curation.random_pool import RANDOM_MODE, PoolTooSmallError, random_pool_rows, uncurated_pool
from pipelines.manifest import CURATED, IMAGES
from tests.helpers import images_row

POOL_SIZE = 6
SAMPLE_SIZE = 2
DRAWS = 600
# Each pool row is drawn with probability SAMPLE_SIZE / POOL_SIZE; over DRAWS seeds the observed share
# has a standard deviation of about 0.02, so 0.08 is a 4-sigma band.
SHARE_TOLERANCE = 0.08


IMAGES_TABLE = IMAGES.table_from_rows(
    [
        images_row("seed", "curated", "curated"),
        *(images_row(f"w{row}", "web", "uncurated") for row in range(POOL_SIZE)),
        images_row("test", "eval", "eval"),
    ]
)
POOL_IDS = {f"id-w{row}" for row in range(POOL_SIZE)}


def test_a_full_sample_is_the_whole_pool_with_random_provenance():
    rows = random_pool_rows(uncurated_pool(IMAGES_TABLE), POOL_SIZE, seed=0)
    assert rows.schema.equals(CURATED.arrow, check_metadata=False)
    assert set(rows.column("image_id").to_pylist()) == POOL_IDS and rows.num_rows == POOL_SIZE
    assert set(rows.column("curation_mode").to_pylist()) == {RANDOM_MODE}
    for name in ("query_image_id", "similarity", "rank", "cluster"):
        assert rows.column(name).null_count == POOL_SIZE, name


def test_a_pool_smaller_than_the_sample_is_an_error():
    with pytest.raises(PoolTooSmallError, match=f"{POOL_SIZE} rows"):
        random_pool_rows(uncurated_pool(IMAGES_TABLE), POOL_SIZE + 1, seed=0)


def test_same_seed_same_rows_whatever_the_input_order():
    reversed_table = IMAGES_TABLE.take(np.arange(IMAGES_TABLE.num_rows)[::-1])
    first = random_pool_rows(uncurated_pool(IMAGES_TABLE), SAMPLE_SIZE, seed=3).column("image_id").to_pylist()
    again = (
        random_pool_rows(uncurated_pool(reversed_table), SAMPLE_SIZE, seed=3).column("image_id").to_pylist()
    )
    assert first == again and len(set(first)) == SAMPLE_SIZE


def test_every_pool_row_is_drawn_with_probability_sample_over_pool():
    counts = dict.fromkeys(POOL_IDS, 0)
    for seed in range(DRAWS):
        for image_id in (
            random_pool_rows(uncurated_pool(IMAGES_TABLE), SAMPLE_SIZE, seed).column("image_id").to_pylist()
        ):
            counts[image_id] += 1
    shares = np.array(list(counts.values())) / DRAWS
    np.testing.assert_allclose(shares, SAMPLE_SIZE / POOL_SIZE, atol=SHARE_TOLERANCE)
