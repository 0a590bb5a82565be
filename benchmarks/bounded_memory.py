"""Peak memory at 2M x 256: k-means assignment and the dedup graph, streamed over parts vs all at once;
the hierarchical k-means stage (balance) beside the flat one (cluster).

    nice python -m benchmarks.bounded_memory [--rows 2000000] [--dim 256] [--part-rows 65536]
                                             [--clusters 256] [--iterations 5] [--modes floor,...]

Input: an embeddings manifest of float16 rows written part by part through the Store, with keys rising
from part to part as the embed stage's content shards leave them (as benchmarks/kmeans_overhead.py writes
its input). A COPY_FRACTION of each part's rows are near copies (cosine about 0.9) of other rows, so the
dedup graph has real components. Each measurement runs in its own process and reports its peak RSS
(VmHWM; see benchmarks/peak_memory.py for why not ru_maxrss):
  floor             the interpreter with lvd, Faiss and pyarrow imported: every process pays it
  k-means streamed  run_stage(cluster): keys, the training sample, centroids, then one shard at a time
  balance streamed  run_stage(balance): the same, a 3-level tree over the same leaves (k, k/8, k/32), and a
                    balanced sample of BALANCE_TARGET_SHARE of the rows (their images rows read part by part)
  k-means at once   the whole manifest as one float32 matrix, trained on the same seeded sample, every row
                    assigned in one Faiss call (what the stage did before it streamed)
  graph streamed    copy_dedup's path: the index filled a block at a time from the parts, each block of
                    queries searched, its edges fed to ComponentLabels and counted by EdgeTally
                    (graph.streamed_components)
  graph at once     one float32 matrix, the index filled from it, every edge materialised
                    (knn.searched_edges, what copy_dedup did before it streamed), then connected_components
Both graph runs use the same IVF index (built once here: rows / GRAPH_ROWS_PER_LIST cells found through
HNSW, nprobe GRAPH_NPROBE) and copy_dedup's k with the paper's raw-cosine threshold (GRAPH_CONFIG); the
index itself holds every vector in both.
Peaks are high-water marks: "above floor" is approximate (memory freed after the imports is reused).
The streamed and all-at-once results are compared (assignments, component labels).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import curation  # noqa: F401  (registers the stages)
from benchmarks.peak_memory import peak_rss_mib
from curation.balance import BalanceConfig
from curation.cluster import ClusterConfig, train_centroids
from curation.dedup.components import connected_components
from curation.dedup.copy import PAPER_COPY_THRESHOLD, CopyDedupConfig
from curation.dedup.graph import streamed_components
from curation.embed import EMBEDDINGS
from curation.hierarchy import Level
from curation.search.knn import fill_index, searched_edges
from curation.vector_parts import PartRows, located_columns, manifest_parts, read_unit_rows, stored_vectors
from curation.vectors import (
    EMBEDDING_COLUMN,
    embedding_array,
    embedding_matrix,
    float16_rows,
    read_columns,
    unit_rows,
)
from pipelines.manifest import CURATED, IMAGES, ROW_KEY_COLUMNS, part_name, row_order, sort_rows
from pipelines.stage import Manifest, get_stage, run_stage
from pipelines.store import Store

DEFAULT_ROWS = 2_000_000
DEFAULT_DIM = 256
DEFAULT_PART_ROWS = 65_536
DEFAULT_CLUSTERS = 256
DEFAULT_ITERATIONS = 5
COPY_FRACTION = 0.2
IMAGE_BYTES = 20_000  # the images manifest's stand-in files: sizes only, never opened
IMAGE_SIDE = 256
COPY_NOISE = 0.5  # offset norm of a copy from its original: cosine about 1 / sqrt(1 + 0.5^2) = 0.89
# Small cells found through HNSW (few links) keep the 2M-row graph to a couple of minutes on 2 cores;
# 8 cells per query find most near copies.
GRAPH_ROWS_PER_LIST = 64
HNSW_LINKS = 16
GRAPH_NPROBE = 8
SEED = 0
KIB = 1024
MIB = KIB * KIB
FLOAT16_BYTES = 2
FLOAT32_BYTES = 4
INT64_BYTES = 8
EDGE_BYTES = 2 * INT64_BYTES + FLOAT32_BYTES  # source, target, cosine
BALANCE_TARGET_SHARE = 0.1
# Upper levels of the balance benchmark's tree: the leaves (--clusters) over these, the reference's ratios.
BALANCE_LEVEL_DIVISORS = (8, 32)
MANIFEST_FIELDS = ("manifest", "images")
# copy_dedup's k with the paper's raw-cosine threshold: the stage's default calibrates one on synthetic
# copies of images, which this benchmark's vectors have none of.
GRAPH_CONFIG = CopyDedupConfig(threshold=PAPER_COPY_THRESHOLD, score_normalization=False)
MODES = ("floor", "kmeans_streamed", "balance_streamed", "kmeans_at_once", "graph_streamed", "graph_at_once")


@dataclass(frozen=True, slots=True)
class Job:
    """What every measuring process needs: the input, the settings, where to leave results."""

    manifest: Manifest
    images: Manifest
    store_root: str
    index_path: str
    results_dir: str
    clusters: int
    iterations: int
    rows_per_shard: int


def write_manifest(root: Path, num_rows: int, dim: int, part_rows: int) -> tuple[Manifest, Manifest, int]:
    """The embeddings manifest and its images manifest, one part at a time (never all rows in memory);
    also the key bytes."""
    store = Store(root)
    folder = f"{store.root}/embeddings"
    images_folder = f"{store.root}/images"
    rng = np.random.default_rng(SEED)
    key_bytes = 0
    for start in range(0, num_rows, part_rows):
        count = min(part_rows, num_rows - start)
        vectors = rng.normal(size=(count, dim))
        copies = rng.random(count) < COPY_FRACTION
        originals = rng.integers(0, count, int(copies.sum()))
        vectors[copies] = vectors[originals] + COPY_NOISE * rng.normal(size=(len(originals), dim))
        rows = range(start, start + count)
        table = pa.table(
            {
                "image_id": [f"{row:064x}" for row in rows],
                "source": ["pool"] * count,
                "role": ["uncurated"] * count,
                "uri": [f"/pool/{row}.jpg" for row in rows],
                "embedding": embedding_array(vectors / np.linalg.norm(vectors, axis=1, keepdims=True)),
            }
        )
        key_bytes += table.select(list(ROW_KEY_COLUMNS)).nbytes
        store.write_table_atomic(f"{folder}/{part_name(f'{start:012d}')}", EMBEDDINGS.validate(table))
        store.write_table_atomic(f"{images_folder}/{part_name(f'{start:012d}')}", images_rows(table))
    manifest = Manifest(
        uri=store.uri_of(folder), schema_name="embeddings", digest=f"bm-{num_rows}-{dim}", num_rows=num_rows
    )
    images = Manifest(
        uri=store.uri_of(images_folder), schema_name="images", digest=f"bm-img-{num_rows}", num_rows=num_rows
    )
    return manifest, images, key_bytes


def images_rows(embeddings: pa.Table) -> pa.Table:
    """IMAGES rows for embeddings rows (files that need not exist: nothing opens them)."""
    count = embeddings.num_rows
    columns = {
        "container": pa.array(["file"] * count),
        "byte_offset": pa.nulls(count, pa.int64()),
        "byte_size": pa.array([IMAGE_BYTES] * count, pa.int64()),
        "width": pa.array([IMAGE_SIDE] * count, pa.int32()),
        "height": pa.array([IMAGE_SIDE] * count, pa.int32()),
        "format": pa.array(["JPEG"] * count),
        "mode": pa.array(["RGB"] * count),
        "num_frames": pa.array([1] * count, pa.int32()),
    }
    table = embeddings.select(["image_id", "source", "role", "uri"])
    for name, column in columns.items():
        table = table.append_column(name, column)
    return IMAGES.validate(table)


def whole_parts(manifest: Manifest) -> list[PartRows]:
    """Every row of each part, as PartRows, in part order (the rows' global order)."""
    fs, parts = manifest_parts(manifest)
    located = []
    for path in parts:
        count = pq.ParquetFile(path, filesystem=fs).metadata.num_rows
        located.append(PartRows(fs, (path,), np.zeros(count, np.int64), np.arange(count, dtype=np.int64)))
    return located


def graph_index(manifest: Manifest, num_rows: int, path: Path) -> int:
    """An empty IVF index over seeded sample rows as cells (HNSW finds a row's cell), written to `path`.

    Returns the number of cells. Sample rows as cells, not k-means centroids: k-means over this many cells
    would take longer than the measurement, and the cells only need to spread like the data.
    """
    nlist = max(1, num_rows // GRAPH_ROWS_PER_LIST)
    parts = whole_parts(manifest)
    rng = np.random.default_rng(SEED)
    picked = np.sort(rng.choice(num_rows, nlist, replace=False))
    bounds = np.cumsum([0] + [len(part) for part in parts])
    cells = np.concatenate(
        [
            read_unit_rows(part.take(picked[(picked >= low) & (picked < high)] - low))
            for part, low, high in zip(parts, bounds[:-1], bounds[1:], strict=True)
            if ((picked >= low) & (picked < high)).any()
        ]
    )
    quantizer = faiss.IndexHNSWFlat(cells.shape[1], HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
    quantizer.add(cells)
    index = faiss.IndexIVFFlat(quantizer, cells.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True  # why: the quantizer already holds the cells, there is nothing to train
    faiss.write_index(index, str(path))
    return nlist


def _graph_index(job: Job) -> faiss.Index:
    index = faiss.read_index(job.index_path)
    index.nprobe = GRAPH_NPROBE
    return index


def kmeans_streamed(job: Job) -> dict[str, Any]:
    cfg = ClusterConfig(
        num_clusters=job.clusters,
        num_iterations=job.iterations,
        rows_per_shard=job.rows_per_shard,
        use_gpu=False,
    )
    run = run_stage(
        get_stage("cluster"),
        cfg,
        {"embeddings": job.manifest},
        store=Store(job.store_root),
        show_progress=False,
    )
    peak = peak_rss_mib()
    # After the peak is taken: put the assignments in key order to compare them with the other run's.
    assigned = sort_rows(run.outputs["assignments"].read())
    np.savez(
        f"{job.results_dir}/kmeans_streamed.npz",
        cluster=np.asarray(assigned.column("cluster")),
        similarity=np.asarray(assigned.column("similarity")),
    )
    return {"peak_mib": peak, "stage_seconds": run.record["stats"]["seconds"]}


def balance_streamed(job: Job) -> dict[str, Any]:
    leaves = job.clusters
    cfg = BalanceConfig(
        levels=(
            Level(clusters=leaves),
            *(Level(clusters=max(1, leaves // divisor)) for divisor in BALANCE_LEVEL_DIVISORS),
        ),
        target_rows=int(BALANCE_TARGET_SHARE * job.manifest.num_rows),
        rows_per_shard=job.rows_per_shard,
        use_gpu=False,
    )
    # The curated input only sizes the sample when target_rows is null: an empty one stands in.
    curated = Path(job.results_dir) / "empty-curated"
    curated.mkdir(exist_ok=True)
    pq.write_table(CURATED.empty_table(), curated / part_name("all"))
    inputs = {
        "embeddings": job.manifest,
        "images": job.images,
        "curated": Manifest(str(curated), "curated", "empty", 0),
    }
    run = run_stage(get_stage("balance"), cfg, inputs, store=Store(job.store_root), show_progress=False)
    peak = peak_rss_mib()
    return {
        "peak_mib": peak,
        "stage_seconds": run.record["stats"]["seconds"],
        "selected": run.outputs["curated"].num_rows,
    }


def kmeans_at_once(job: Job) -> dict[str, Any]:
    table = read_columns(job.manifest, EMBEDDINGS, [*ROW_KEY_COLUMNS, "role", "embedding"])
    clustered = pc.is_in(table.column("role"), pa.array(list(ClusterConfig().roles), pa.string()))
    rows = np.flatnonzero(np.asarray(clustered.combine_chunks()))
    order = row_order(table.select(list(ROW_KEY_COLUMNS)).take(rows))
    vectors = unit_rows(float16_rows(table.column("embedding")), rows[order])
    cfg = ClusterConfig(num_clusters=job.clusters, num_iterations=job.iterations, use_gpu=False)
    train_rows = min(len(vectors), cfg.num_clusters * cfg.max_points_per_centroid)
    sample = np.sort(np.random.default_rng(cfg.seed).choice(len(vectors), train_rows, replace=False))
    centroids = train_centroids(vectors[sample], cfg.num_clusters, cfg)
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    similarity, nearest = index.search(vectors, 1)
    peak = peak_rss_mib()
    np.savez(
        f"{job.results_dir}/kmeans_at_once.npz",
        cluster=nearest[:, 0].astype(np.int32),
        similarity=similarity[:, 0],
    )
    return {"peak_mib": peak}


def graph_streamed(job: Job) -> dict[str, Any]:
    """copy_dedup's streaming path (`graph.streamed_components`) on the benchmark's prebuilt index."""
    cfg = GRAPH_CONFIG
    _, where = located_columns(job.manifest, EMBEDDINGS, list(ROW_KEY_COLUMNS))
    rows = stored_vectors(where, EMBEDDING_COLUMN)
    index = fill_index(_graph_index(job), rows)
    ids = np.arange(len(rows))
    labels, edges = streamed_components(rows, index, cfg.num_neighbours, cfg.threshold, ids, len(rows))
    peak = peak_rss_mib()
    np.save(f"{job.results_dir}/graph_streamed.npy", labels)
    return {"peak_mib": peak, "edges": edges}


def graph_at_once(job: Job) -> dict[str, Any]:
    cfg = GRAPH_CONFIG
    vectors = embedding_matrix(read_columns(job.manifest, EMBEDDINGS, ["embedding"]))
    index = _graph_index(job)
    index.add(vectors)
    edges = searched_edges(vectors, index, cfg.num_neighbours, cfg.threshold)
    labels = connected_components(len(vectors), edges.sources, edges.targets)
    peak = peak_rss_mib()
    np.save(f"{job.results_dir}/graph_at_once.npy", labels)
    return {"peak_mib": peak, "edges": len(edges)}


def measure_in_process(mode: str, job: Job) -> dict[str, Any]:
    """Runs one measurement in this process (a fresh one: its peak RSS is the measurement's own)."""
    started = time.perf_counter()
    if mode == "floor":
        result = {"peak_mib": peak_rss_mib()}
    else:
        result = {
            "kmeans_streamed": kmeans_streamed,
            "balance_streamed": balance_streamed,
            "kmeans_at_once": kmeans_at_once,
            "graph_streamed": graph_streamed,
            "graph_at_once": graph_at_once,
        }[mode](job)
    return result | {"seconds": time.perf_counter() - started}


def _in_subprocess(mode: str, job: Job) -> dict[str, Any]:
    request = json.dumps({"mode": mode, "job": _job_dict(job)})
    command = [sys.executable, "-m", "benchmarks.bounded_memory", "--worker", request]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _job_dict(job: Job) -> dict[str, Any]:
    fields = {name: getattr(job, name) for name in Job.__slots__ if name not in MANIFEST_FIELDS}
    return fields | {
        name: [
            getattr(job, name).uri,
            getattr(job, name).schema_name,
            getattr(job, name).digest,
            getattr(job, name).num_rows,
        ]
        for name in MANIFEST_FIELDS
    }


def _job_from_dict(values: dict[str, Any]) -> Job:
    return Job(**(values | {name: Manifest(*values[name]) for name in MANIFEST_FIELDS}))


def theory_mib(num_rows: int, dim: int, key_bytes: int, job: Job, edges: int) -> dict[str, float]:
    """The sizes that decide each run's memory, in MiB."""
    cfg = ClusterConfig(num_clusters=job.clusters)
    training_rows = min(num_rows, cfg.num_clusters * cfg.max_points_per_centroid)
    return {
        "float16_embeddings": num_rows * dim * FLOAT16_BYTES / MIB,
        "float32_matrix": num_rows * dim * FLOAT32_BYTES / MIB,
        "keys": key_bytes / MIB,
        "training_sample": training_rows * dim * FLOAT32_BYTES / MIB,
        "one_shard": min(num_rows, job.rows_per_shard) * dim * FLOAT32_BYTES / MIB,
        "ivf_index": num_rows * (dim * FLOAT32_BYTES + INT64_BYTES) / MIB,
        "labels": num_rows * INT64_BYTES / MIB,
        "edges": edges * EDGE_BYTES / MIB,
    }


def measure(
    rows: int = DEFAULT_ROWS,
    dim: int = DEFAULT_DIM,
    part_rows: int = DEFAULT_PART_ROWS,
    clusters: int = DEFAULT_CLUSTERS,
    iterations: int = DEFAULT_ITERATIONS,
    modes: tuple[str, ...] = MODES,
) -> dict[str, Any]:
    """Each of `modes`' peak RSS (MiB) and seconds, the theoretical sizes, and (when both ran) whether
    streamed == at once."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest, images, key_bytes = write_manifest(root / "input", rows, dim, part_rows)
        (root / "results").mkdir()
        job = Job(
            manifest=manifest,
            images=images,
            store_root=str(root / "store"),
            index_path=str(root / "graph.index"),
            results_dir=str(root / "results"),
            clusters=clusters,
            iterations=iterations,
            rows_per_shard=ClusterConfig().rows_per_shard,
        )
        nlist = graph_index(manifest, rows, Path(job.index_path)) if "graph_streamed" in modes else 0
        runs = {mode: _in_subprocess(mode, job) for mode in MODES if mode in modes}
        result = {
            "rows": rows,
            "dim": dim,
            "clusters": clusters,
            "iterations": iterations,
            "ivf_lists": nlist,
            "runs": runs,
            "theory_mib": theory_mib(
                rows, dim, key_bytes, job, runs.get("graph_at_once", {}).get("edges", 0)
            ),
        }
        if {"kmeans_streamed", "kmeans_at_once"} <= set(runs):
            streamed = np.load(f"{job.results_dir}/kmeans_streamed.npz")
            at_once = np.load(f"{job.results_dir}/kmeans_at_once.npz")
            result["same_clusters"] = bool(np.array_equal(streamed["cluster"], at_once["cluster"]))
            result["max_similarity_difference"] = float(
                np.abs(streamed["similarity"] - at_once["similarity"]).max()
            )
        if {"graph_streamed", "graph_at_once"} <= set(runs):
            labels_streamed = np.load(f"{job.results_dir}/graph_streamed.npy")
            labels_at_once = np.load(f"{job.results_dir}/graph_at_once.npy")
            result["same_components"] = bool(np.array_equal(labels_streamed, labels_at_once))
            result["groups"] = int(len(labels_at_once) - len(np.unique(labels_at_once)))
        return result


def report(result: dict[str, Any]) -> None:
    runs, theory = result["runs"], result["theory_mib"]
    floor = runs["floor"]["peak_mib"] if "floor" in runs else 0.0
    dedup = GRAPH_CONFIG
    print(
        f"{result['rows']:,} x {result['dim']} float16 rows; k-means k = {result['clusters']}, "
        f"{result['iterations']} iterations; graph: IVF-HNSW {result['ivf_lists']:,} lists, "
        f"nprobe {GRAPH_NPROBE}, k = {dedup.num_neighbours}, cosine > {dedup.threshold}"
    )
    print(f"{'run':<20}{'peak RSS MiB':>14}{'above floor':>13}{'seconds':>9}  what it holds (MiB, theory)")
    held = {
        "floor": "imports only",
        "kmeans_streamed": f"keys {theory['keys']:.0f} + sample {theory['training_sample']:.0f} "
        f"+ one shard {theory['one_shard']:.0f}",
        "balance_streamed": f"as k-means streamed + the sample ({BALANCE_TARGET_SHARE:.0%} of the rows)",
        "kmeans_at_once": f"float16 {theory['float16_embeddings']:.0f} "
        f"+ float32 {theory['float32_matrix']:.0f} + keys {theory['keys']:.0f}",
        "graph_streamed": f"index {theory['ivf_index']:.0f} + labels {theory['labels']:.0f} + one part",
        "graph_at_once": f"index {theory['ivf_index']:.0f} + float32 {theory['float32_matrix']:.0f} "
        f"+ edges {theory['edges']:.0f} (x2-3 while deduplicated)",
    }
    for mode, found in runs.items():
        peak = found["peak_mib"]
        print(f"{mode:<20}{peak:>14,.0f}{peak - floor:>13,.0f}{found['seconds']:>9.1f}  {held[mode]}")
    for name in ("kmeans", "graph"):
        if f"{name}_streamed" in runs and f"{name}_at_once" in runs:
            ratio = runs[f"{name}_streamed"]["peak_mib"] / runs[f"{name}_at_once"]["peak_mib"]
            print(f"{name}: streamed / at once peak RSS = {ratio:.2f}")
    if {"balance_streamed", "kmeans_streamed"} <= set(runs):
        ratio = runs["balance_streamed"]["peak_mib"] / runs["kmeans_streamed"]["peak_mib"]
        taken = runs["balance_streamed"]["selected"]
        print(f"balance / cluster stage peak RSS = {ratio:.2f} ({taken:,} rows taken)")
    if "same_clusters" in result:
        print(
            f"same assignments: {result['same_clusters']} (max similarity difference "
            f"{result['max_similarity_difference']:.1e})"
        )
    if "same_components" in result:
        print(
            f"same components: {result['same_components']} ({result['groups']:,} rows duplicate another); "
            f"distinct edges: streamed {runs['graph_streamed']['edges']:,}, "
            f"at once {runs['graph_at_once']['edges']:,}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--dim", type=int, default=DEFAULT_DIM)
    parser.add_argument("--part-rows", type=int, default=DEFAULT_PART_ROWS)
    parser.add_argument("--clusters", type=int, default=DEFAULT_CLUSTERS)
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        request = json.loads(args.worker)
        print(json.dumps(measure_in_process(request["mode"], _job_from_dict(request["job"]))))
        return
    modes = tuple(args.modes.split(","))
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    report(measure(args.rows, args.dim, args.part_rows, args.clusters, args.iterations, modes))


if __name__ == "__main__":
    main()
