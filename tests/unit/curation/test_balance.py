"""The balance stage: an even split over the top-level clusters, nested paths, the streamed pick equal to
the in-memory rule over every row, and the same sample whatever the shard size or part layout."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import curation  # noqa: F401  (registers the stages)
from curation.balance import (
    BALANCED_MODE,
    LEAF_ASSIGNMENTS,
    PATHS,
    TREE,
    BalanceConfig,
    balance_tables,
    uniform_draws,
)
from curation.embed import EMBEDDINGS
from curation.hierarchy import Level, top_per_leaf
from pipelines.manifest import CURATED, IMAGES, ManifestError, row_order, sort_rows
from pipelines.stage import Manifest, get_stage, run_stage
from pipelines.store import Store
from tests.helpers import images_row
from tests.unit.curation.embedding_data import embeddings_table, write_manifest

# A long-tailed mixture of orthogonal concepts (a crawl's sizes, scaled down); the rarest holds 30 rows.
CONCEPT_SIZES = (1200, 600, 300, 150, 80, 50, 40, 30)
DIM = 32
NOISE = 0.05
NUM_PARTS = 3
TOP_CLUSTERS = 8
TARGET = 160  # 20 per top-level cluster, if none is smaller
CFG = BalanceConfig(
    levels=(
        Level(clusters=32, resampling_steps=3, points_per_cluster=5),
        Level(clusters=TOP_CLUSTERS, resampling_steps=3, points_per_cluster=2),
    ),
    target_rows=TARGET,
    max_points_per_centroid=60,  # level 1 trains on 1,920 of the 2,450 rows: the sampled path
    rows_per_shard=400,
    use_gpu=False,
)


def _pool() -> tuple[pa.Table, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = np.linalg.qr(rng.normal(size=(DIM, DIM)))[0][: len(CONCEPT_SIZES)]
    concept = np.repeat(np.arange(len(CONCEPT_SIZES)), CONCEPT_SIZES)
    vectors = centres[concept] + NOISE * rng.normal(size=(len(concept), DIM))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    return embeddings_table(vectors, "web", "uncurated", "w"), concept


def _inputs(root, layout_seed: int = 1) -> dict[str, Manifest]:
    """Pool embeddings shuffled over NUM_PARTS parts, their images rows, and a curated set (size unused)."""
    table, _ = _pool()
    table = table.take(np.random.default_rng(layout_seed).permutation(table.num_rows))
    folder = root / f"embeddings-{layout_seed}"
    folder.mkdir(parents=True)
    for index, part in enumerate(np.array_split(np.arange(table.num_rows), NUM_PARTS)):
        pq.write_table(table.take(part), folder / f"part-{index}.parquet")
    embeddings = Manifest(str(folder), EMBEDDINGS.name, f"layout-{layout_seed}", table.num_rows)
    rows = [
        images_row("x", "web", "uncurated") | {"image_id": image_id, "uri": uri}
        for image_id, uri in zip(
            table.column("image_id").to_pylist(), table.column("uri").to_pylist(), strict=True
        )
    ]
    images = write_manifest(root, f"images-{layout_seed}", IMAGES, IMAGES.table_from_rows(rows))
    curated = write_manifest(root, "curated", CURATED, CURATED.empty_table())
    return {"embeddings": embeddings, "images": images, "curated": curated}


def _run(root, cfg: BalanceConfig = CFG, layout_seed: int = 1):
    inputs = _inputs(root / "inputs", layout_seed)
    return run_stage(get_stage("balance"), cfg, inputs, store=Store(root / "store"), show_progress=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("balance"))


def test_the_target_splits_evenly_over_the_top_level_clusters(run):
    curated = run.outputs["curated"].read(CURATED)
    paths = run.outputs["paths"].read(PATHS)
    assert curated.num_rows == TARGET == len(set(curated.column("image_id").to_pylist()))
    assert set(curated.column("curation_mode").to_pylist()) == {BALANCED_MODE}
    top = np.array([path[-1] for path in paths.column("cluster_path").to_pylist()])
    taken = np.bincount(top, minlength=TOP_CLUSTERS)
    tree = run.outputs["tree"].read(TREE)
    sizes = np.asarray(tree.filter(pa.compute.equal(tree.column("level"), 1)).column("size"))
    # Within rounding: a cluster smaller than the even share is taken whole, the others share the rest.
    whole = taken == sizes
    capped = taken[~whole]
    assert capped.max() - capped.min() <= 1 and sizes[whole].max(initial=0) <= capped.min()
    assert np.array_equal(taken, np.minimum(sizes, capped.min()) + (taken > capped.min()))


def test_paths_nest_and_the_tree_counts_what_was_taken(run):
    tree = run.outputs["tree"].read(TREE)
    paths = run.outputs["paths"].read(PATHS).column("cluster_path").to_pylist()
    leaves = tree.filter(pa.compute.equal(tree.column("level"), 0))
    parent_of_leaf = dict(
        zip(leaves.column("cluster").to_pylist(), leaves.column("parent").to_pylist(), strict=True)
    )
    assert all(parent_of_leaf[leaf] == top for leaf, top in paths)
    taken = np.bincount([leaf for leaf, _ in paths], minlength=leaves.num_rows)
    np.testing.assert_array_equal(np.asarray(leaves.column("selected")), taken)
    for level in (0, 1):
        rows = tree.filter(pa.compute.equal(tree.column("level"), level))
        assert pa.compute.sum(rows.column("size")).as_py() == sum(CONCEPT_SIZES)
        assert pa.compute.sum(rows.column("selected")).as_py() == TARGET
    (view,) = balance_tables(run)
    assert [row[:2] for row in view.rows] == [("1", "32"), ("2", str(TOP_CLUSTERS))]


def test_the_streamed_pick_is_the_rule_applied_to_every_row_at_once(run):
    assigned = run.outputs["assignments"].read(LEAF_ASSIGNMENTS)
    tree = run.outputs["tree"].read(TREE)
    leaves = tree.filter(pa.compute.equal(tree.column("level"), 0))
    key_rank = np.empty(assigned.num_rows, np.int64)
    key_rank[row_order(assigned)] = np.arange(assigned.num_rows)
    picked = top_per_leaf(
        np.asarray(assigned.column("cluster")),
        np.asarray(assigned.column("draw")),
        np.asarray(leaves.column("selected")),
        key_rank,
    )
    expected = sorted(assigned.column("image_id").take(pa.array(picked)).to_pylist())
    assert run.outputs["curated"].read(CURATED).column("image_id").to_pylist() == expected


def test_the_draws_are_uniform_and_keyed_by_the_row_alone():
    keys = pa.table({"image_id": [f"{row:08d}" for row in range(4000)], "uri": ["u"] * 4000})
    draws = uniform_draws(keys, seed=0)
    assert draws.min() >= 0 and draws.max() < 1
    assert abs(draws.mean() - 0.5) < 0.02  # 4-sigma band of a uniform mean over 4,000 draws
    np.testing.assert_array_equal(uniform_draws(keys.slice(10, 5), seed=0), draws[10:15])
    assert not np.array_equal(uniform_draws(keys, seed=1), draws)


def test_the_sample_does_not_depend_on_shard_size_or_part_layout(run, tmp_path):
    other = _run(tmp_path, dataclasses.replace(CFG, rows_per_shard=700), layout_seed=2)
    assert other.outputs["curated"].read(CURATED).equals(run.outputs["curated"].read(CURATED))


def test_a_picked_row_missing_from_the_images_manifest_is_an_error(tmp_path):
    inputs = _inputs(tmp_path / "inputs")
    images = sort_rows(inputs["images"].read(IMAGES)).slice(1)  # the first pool row's images row is gone
    inputs["images"] = write_manifest(tmp_path, "fewer-images", IMAGES, images)
    everything = dataclasses.replace(CFG, target_rows=sum(CONCEPT_SIZES))
    with pytest.raises(ManifestError, match="picked pool rows"):
        run_stage(
            get_stage("balance"), everything, inputs, store=Store(tmp_path / "store"), show_progress=False
        )
