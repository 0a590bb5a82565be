"""The `balance` stage: hierarchical k-means over the pool and a sample balanced down its tree (Vo et al.
2024, DINOv3's curation), in bounded memory like the `cluster` stage.

embeddings --keys and role only (never the embedding column)--> pool rows of cfg.roles, key order
   --seeded sample (<= levels[0].clusters * max_points_per_centroid rows): only those rows read-->
     hierarchy.hierarchical_kmeans (each level resampled; level t clusters level t - 1's centroids)
     --> the tree's centroids and each level's parents
   --ctx.map_shards over key-sorted shards: each worker reads its rows, finds the nearest leaf centroid,
     and a uniform draw from a keyed hash of the row's key--> `assignments` (every pool row)
   --part by part: leaf sizes --> sizes of every level --> budgets (target split evenly over the top
     clusters, then down the tree)
   --part by part: the best rows of each leaf so far (its budget of them; by draw or cosine)--> picked
   --images, part by part: the picked rows' images rows--> `curated` (CURATED, cluster = leaf),
     `paths` (each curated row's cluster at every level), `tree` (per level: size before, rows after),
     pictures (cluster sizes before and after; a row of picked images per top-level cluster)

Memory: the key columns, the training sample and the centroids; a shard worker adds one shard's rows; the
pick and the curated rows are the target's size. Departure from the reference: level 1 is fitted and
resampled on the seeded sample (Faiss's cap), not on every row; every row is then assigned.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.balance_report import clusters_sheet, composition_view, evenness, sizes_plot
from curation.cluster import (
    ASSIGNMENTS,
    DEFAULT_POINTS_PER_CENTROID,
    assign_shard,
    cluster_sizes,
    pool_rows,
    seeded_sample,
)
from curation.embed import EMBEDDINGS
from curation.hierarchy import (
    ClusterTree,
    LeafPick,
    Level,
    ancestors,
    hierarchical_kmeans,
    leaf_priority,
    level_budgets,
    level_sizes,
    top_per_leaf,
)
from curation.vector_parts import ChosenRows, manifest_parts
from curation.vectors import embedding_array
from pipelines.manifest import (
    CURATED,
    EMBEDDING,
    IMAGES,
    ROW_KEY_COLUMNS,
    ManifestError,
    ManifestSchema,
    Role,
    row_order,
    sort_rows,
)
from pipelines.stage import Manifest, ShardResult, StageContext, StageRun, StageSpec, register_stage
from pipelines.validation import require
from pipelines.views import TableView

BALANCED_MODE = "balanced"
# CURATED requires a seed source; a balanced row answers to no seed set, so it names the mode instead.
BALANCED_SEED_SOURCE = BALANCED_MODE
SIZES_PLOT = "balance_sizes.png"
SHEET_NAME = "balance_clusters.png"
DRAW_BYTES = 8
# A draw is the hash's top 53 bits over 2^53: exactly representable, uniform on [0, 1).
DRAW_MANTISSA_BITS = 53
# The authors' 4-level tree for web images (743M images; ssl-data-curation's 4levels_web_based_images):
# 10M / 500k / 50k / 10k clusters, resampled 1 (none) / 10 / 10 / 10 times on the 1 / 10 / 5 / 3 points
# nearest each centroid (about half a cluster's mean size). Their level 1 is 100k clusters split 100
# ways; lvd fits the 10M directly.
PAPER_LEVELS = (
    Level(clusters=10_000_000, resampling_steps=1, points_per_cluster=1),
    Level(clusters=500_000, resampling_steps=10, points_per_cluster=10),
    Level(clusters=50_000, resampling_steps=10, points_per_cluster=5),
    Level(clusters=10_000, resampling_steps=10, points_per_cluster=3),
)


@dataclass(frozen=True, kw_only=True, slots=True)
class BalanceConfig:
    levels: tuple[Level, ...] = PAPER_LEVELS
    """The tree, leaves first: each level's clusters and resampling (see hierarchy.Level)."""
    target_rows: int | None = None
    """Rows to sample; None: as many as the curated set holds (so the two compare at equal size)."""
    leaf_pick: LeafPick = "random"
    """Inside a leaf: uniform rows (`random`, the reference's default and its better ablation) or the
    rows nearest the leaf's centroid (`closest`)."""
    max_points_per_centroid: int = DEFAULT_POINTS_PER_CENTROID
    """Level 1 trains on at most levels[0].clusters * this many sampled rows; every row is assigned."""
    roles: tuple[Role, ...] = ("uncurated",)
    seed: int = 0
    rows_per_shard: int = 65_536
    use_gpu: bool = True
    """Fit and assign on the GPUs Faiss sees, if any (the `gpu` extra's faiss-gpu build); CPU otherwise."""

    def __post_init__(self) -> None:
        require(len(self.levels) >= 1, "balance needs at least one level")
        clusters = [level.clusters for level in self.levels]
        require(
            all(upper <= lower for lower, upper in itertools.pairwise(clusters)),
            f"each level must have at most as many clusters as the one below, got {clusters}",
        )
        require(self.target_rows is None or self.target_rows >= 1, "target_rows must be >= 1 or null")
        require(
            self.leaf_pick in ("random", "closest"),
            f"leaf_pick must be random or closest, not {self.leaf_pick!r}",
        )
        require(self.max_points_per_centroid >= 1, "max_points_per_centroid must be >= 1")
        require(self.rows_per_shard >= 1, f"rows_per_shard must be >= 1, got {self.rows_per_shard}")


# Every pool row: its leaf (the nearest level-0 centroid), the cosine to it, and its draw for `random`.
LEAF_ASSIGNMENTS = ManifestSchema(
    name="leaf_assignments",
    version=1,
    fields=(*ASSIGNMENTS.fields, pa.field("draw", pa.float64(), nullable=False)),
)

TREE = ManifestSchema(
    name="cluster_tree",
    version=1,
    fields=(
        pa.field("level", pa.int32(), nullable=False),  # 0 = the leaves
        pa.field("cluster", pa.int32(), nullable=False),
        pa.field("parent", pa.int32()),  # its cluster one level up; null at the top level
        pa.field("size", pa.int64(), nullable=False),  # pool rows under it
        pa.field("selected", pa.int64(), nullable=False),  # of those, rows in the balanced sample
        pa.field("centroid", EMBEDDING, nullable=False),
    ),
)

PATHS = ManifestSchema(
    name="cluster_paths",
    version=1,
    fields=(
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("cluster_path", pa.list_(pa.int32()), nullable=False),  # its cluster per level, leaf first
    ),
)


def uniform_draws(keys: pa.Table, seed: int) -> np.ndarray:
    """[n] float64 in [0, 1): a keyed hash of each row's (image_id, uri). A row draws the same number
    whichever shard or part holds it, so the pick does not depend on how the pool was split."""
    salt = str(seed).encode()
    digests = b"".join(
        hashlib.blake2b(f"{image_id}\n{uri}".encode(), digest_size=DRAW_BYTES, key=salt).digest()
        for image_id, uri in zip(
            keys.column("image_id").to_pylist(), keys.column("uri").to_pylist(), strict=True
        )
    )
    bits = np.frombuffer(digests, dtype="<u8") >> np.uint64(DRAW_BYTES * 8 - DRAW_MANTISSA_BITS)
    return bits.astype(np.float64) / float(1 << DRAW_MANTISSA_BITS)


def leaf_shard(leaves: np.ndarray, seed: int, use_gpu: bool, rows: ChosenRows) -> ShardResult:
    """Shard worker: each row's nearest leaf centroid (cluster's assignment) and its draw."""
    result = assign_shard(leaves, use_gpu, rows)
    assigned = result.tables["assignments"]
    table = assigned.append_column(
        "draw", pa.array(uniform_draws(assigned.select(["image_id", "uri"]), seed))
    )
    return ShardResult(tables={"assignments": table}, stats=result.stats)


def pick_rows(
    fs: fsspec.AbstractFileSystem, parts: Sequence[str], budgets: np.ndarray, leaf_pick: LeafPick
) -> pa.Table:
    """The picked rows (LEAF_ASSIGNMENTS columns) by leaf, best first: each leaf's `budgets[leaf]` rows of
    highest priority, merged part by part (only the best so far are kept; ties go to the lower key, so
    the pick is that of one pass over all rows)."""
    best = LEAF_ASSIGNMENTS.empty_table()
    for part in parts:
        table = LEAF_ASSIGNMENTS.validate(pq.read_table(part, filesystem=fs))
        table = table.filter(pa.array(budgets[np.asarray(table.column("cluster"))] > 0))
        both = pa.concat_tables([best, table])
        key_rank = np.empty(both.num_rows, np.int64)
        key_rank[row_order(both)] = np.arange(both.num_rows)
        priority = leaf_priority(
            leaf_pick, np.asarray(both.column("similarity")), np.asarray(both.column("draw"))
        )
        best = both.take(top_per_leaf(np.asarray(both.column("cluster")), priority, budgets, key_rank))
    return best


def picked_images(images: Manifest, picked: pa.Table) -> pa.Table:
    """The images rows of `picked`, in key order, read part by part.

    Raises:
        ManifestError: a picked row is not in `images` (the inputs come from different runs).
    """
    fs, parts = manifest_parts(images)
    keys = picked.select(list(ROW_KEY_COLUMNS))
    found = [
        IMAGES.validate(pq.read_table(part, filesystem=fs)).join(
            keys, list(ROW_KEY_COLUMNS), join_type="inner"
        )
        for part in parts
    ]
    rows = sort_rows(pa.concat_tables(found, promote_options="none")) if found else IMAGES.empty_table()
    if rows.num_rows != picked.num_rows:
        raise ManifestError(
            f"balance: {picked.num_rows} picked pool rows but {rows.num_rows} of them in the images manifest"
        )
    return IMAGES.validate(rows)


def curated_rows(images: pa.Table, picked: pa.Table) -> pa.Table:
    """CURATED rows of the picked images: cluster = the leaf, similarity to its centroid, rank in the leaf."""
    clusters = np.asarray(picked.column("cluster"))
    rank = np.arange(len(clusters)) - np.searchsorted(clusters, clusters)  # picked is by leaf, best first
    provenance = pa.table(
        {
            "image_id": picked.column("image_id"),
            "uri": picked.column("uri"),
            "similarity": picked.column("similarity"),
            "rank": pa.array(rank.astype(np.int32)),
            "cluster": picked.column("cluster"),
        }
    )
    rows = sort_rows(images.join(provenance, list(ROW_KEY_COLUMNS), join_type="inner"))
    count = rows.num_rows
    rows = rows.append_column("seed_source", pa.array([BALANCED_SEED_SOURCE] * count, pa.string()))
    rows = rows.append_column("curation_mode", pa.array([BALANCED_MODE] * count, pa.string()))
    rows = rows.append_column("query_image_id", pa.nulls(count, pa.string()))
    return CURATED.validate(rows)


def tree_table(tree: ClusterTree, sizes: Sequence[np.ndarray], selected: Sequence[np.ndarray]) -> pa.Table:
    tables = []
    for level, centroids in enumerate(tree.centroids):
        count = len(centroids)
        parent = tree.assignments[level + 1] if level + 1 < len(tree.assignments) else None
        tables.append(
            pa.table(
                {
                    "level": pa.array(np.full(count, level, np.int32)),
                    "cluster": pa.array(np.arange(count, dtype=np.int32)),
                    "parent": pa.nulls(count, pa.int32())
                    if parent is None
                    else pa.array(parent.astype(np.int32)),
                    "size": pa.array(sizes[level]),
                    "selected": pa.array(selected[level]),
                    "centroid": embedding_array(centroids),
                }
            )
        )
    return TREE.validate(pa.concat_tables(tables, promote_options="permissive"))


def balance_tables(run: StageRun) -> list[TableView]:
    tree = run.outputs["tree"].read(TREE)
    return [composition_view(tree)] if tree.num_rows else []


def run_balance(cfg: BalanceConfig, inputs: Mapping[str, Manifest], ctx: StageContext) -> dict[str, Any]:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    rows = pool_rows(ctx, inputs["embeddings"], cfg.roles, cfg.rows_per_shard)
    num_rows = len(rows)
    if num_rows == 0:
        for name, schema in (
            ("assignments", LEAF_ASSIGNMENTS),
            ("tree", TREE),
            ("curated", CURATED),
            ("paths", PATHS),
        ):
            ctx.write_output(name, schema.empty_table())
        return {"rows": 0, "selected": 0}
    train_rows = min(num_rows, cfg.levels[0].clusters * cfg.max_points_per_centroid)
    training = rows.read_unit_rows(seeded_sample(num_rows, train_rows, cfg.seed))
    timings["read_and_sample"] = time.perf_counter() - started

    started = time.perf_counter()
    tree = hierarchical_kmeans(training, cfg.levels, cfg.seed, cfg.use_gpu)
    loaded = training if train_rows == num_rows else None  # the sample is every row: no second read
    del training
    timings["hierarchical_kmeans"] = time.perf_counter() - started

    started = time.perf_counter()
    shards = rows.shards(cfg.rows_per_shard, loaded)
    del rows, loaded
    worker = functools.partial(leaf_shard, tree.centroids[0], cfg.seed, cfg.use_gpu)
    ctx.map_shards(worker, shards, outputs=["assignments"])
    del shards
    timings["assign"] = time.perf_counter() - started

    started = time.perf_counter()
    parts = ctx.store.list_parts(ctx.store.output_dir(ctx.spec.name, ctx.key, "assignments"))
    parents = tree.assignments[1:]
    sizes = level_sizes(parents, cluster_sizes(ctx.store.fs, parts, len(tree.centroids[0])))
    target = cfg.target_rows if cfg.target_rows is not None else inputs["curated"].num_rows
    if target > num_rows:
        ctx.warn(f"target_rows {target} capped at the {num_rows} pool rows")
    budgets = level_budgets(parents, sizes, min(target, num_rows), np.random.default_rng(cfg.seed))
    picked = pick_rows(ctx.store.fs, parts, budgets[0], cfg.leaf_pick)
    timings["pick"] = time.perf_counter() - started

    started = time.perf_counter()
    paths = ancestors(parents, np.asarray(picked.column("cluster")).astype(np.int64))
    ctx.write_output("curated", curated_rows(picked_images(inputs["images"], picked), picked))
    ctx.write_output(
        "paths",
        sort_rows(
            pa.table(
                {
                    "image_id": picked.column("image_id"),
                    "uri": picked.column("uri"),
                    "cluster_path": pa.array(paths.astype(np.int32).tolist(), pa.list_(pa.int32())),
                }
            )
        ),
    )
    ctx.write_output("tree", tree_table(tree, sizes, budgets))
    ctx.write_artifact(SIZES_PLOT, sizes_plot(sizes, budgets))
    ctx.write_artifact(SHEET_NAME, clusters_sheet(picked, paths[:, -1], sizes[-1], budgets[-1]))
    timings["write"] = time.perf_counter() - started
    return {
        "rows": num_rows,
        "training_rows": train_rows,
        "clusters": [len(centroids) for centroids in tree.centroids],
        "target": target,
        "selected": picked.num_rows,
        "top_level_evenness": {"pool": evenness(sizes[-1]), "balanced": evenness(budgets[-1])},
        "top_level_size": {"min": int(sizes[-1].min()), "max": int(sizes[-1].max())},
        "top_level_selected": {"min": int(budgets[-1].min()), "max": int(budgets[-1].max())},
        "seconds": {phase: round(value, 3) for phase, value in timings.items()},
    }


BALANCE = register_stage(
    StageSpec(
        name="balance",
        # 2: assignment shards are the partitions of every row (`pipelines.partitions`), not of role rows
        version=2,
        config_type=BalanceConfig,
        fn=run_balance,
        inputs={"embeddings": EMBEDDINGS, "images": IMAGES, "curated": CURATED},
        outputs={"assignments": LEAF_ASSIGNMENTS, "tree": TREE, "curated": CURATED, "paths": PATHS},
        description="hierarchical k-means of the pool and a sample split evenly down its tree",
        shown_stats={"rows": "pool images", "selected": "balanced rows"},
        tables=balance_tables,
    )
)
