"""Faiss on the GPUs vs the CPU, through lvd's own calls, on the same data: k-means, exact and IVF search.

    python -m benchmarks.faiss_gpu [--rows 1000000] [--queries 10000] [--clusters 4096]

Needs the `gpu` extra (faiss-gpu-cu12; its CPU indexes are the CPU side). The pool is benchmarks/ivf_search's
mixture (anisotropic, overlapping clusters). k-means is `curation.cluster.train_centroids` (spherical, the
cluster stage's settings); the searches are `curation.search.knn.build_index` + `knn_search`, k = 4. Each
line prints CPU and GPU seconds, their ratio, and what the GPU result shares with the CPU one: the exact
search's rows, IVF's recall of the exact top-k, and k-means' mean cosine to the nearest centroid.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

from benchmarks.ivf_search import SEED, K, make_mixture, recall, sample_pool, sample_queries
from curation.cluster import ClusterConfig, train_centroids
from curation.search.knn import build_index, knn_search

DEFAULT_ROWS = 1_000_000
DEFAULT_QUERIES = 10_000
DEFAULT_CLUSTERS = 4_096


def timed(work: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = work()
    return result, time.perf_counter() - started


def mean_cosine_to_nearest(pool: np.ndarray, centroids: np.ndarray) -> float:
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    return float(index.search(pool, 1)[0].mean())


def measure(rows: int, queries: int, clusters: int) -> list[dict[str, Any]]:
    """One entry per task: CPU and GPU seconds and the agreement figure of each side."""
    rng = np.random.default_rng(SEED)
    mixture = make_mixture(rng)
    pool, members = sample_pool(mixture, rows, rng)
    query_rows = sample_queries(mixture, pool, members, queries, rng)
    results = []

    fits = {}
    for device in ("cpu", "gpu"):
        cfg = ClusterConfig(num_clusters=clusters, use_gpu=device == "gpu")
        centroids, seconds = timed(lambda cfg=cfg: train_centroids(pool, clusters, cfg))
        fits[device] = (seconds, mean_cosine_to_nearest(pool, centroids))
    results.append({"task": f"k-means, k = {clusters}", "measure": "mean cosine to nearest", **_sides(fits)})

    exact = None
    for kind in ("flat", "ivf"):
        found = {}
        for device in ("cpu", "gpu"):

            def search(kind=kind, device=device):
                index = build_index(pool, kind, use_gpu=device == "gpu")
                return knn_search(index, query_rows, K)[1]

            rows_found, seconds = timed(search)
            if exact is None:
                exact = rows_found  # the CPU flat search
            found[device] = (seconds, recall(rows_found, exact))
        label = "exact search" if kind == "flat" else "IVF search"
        task = f"{label} (build + {queries:,} queries)"
        results.append({"task": task, "measure": f"recall@{K}", **_sides(found)})
    return results


def _sides(found: dict[str, tuple[float, float]]) -> dict[str, float]:
    return {
        "cpu_seconds": found["cpu"][0],
        "gpu_seconds": found["gpu"][0],
        "cpu_value": found["cpu"][1],
        "gpu_value": found["gpu"][1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--queries", type=int, default=DEFAULT_QUERIES)
    parser.add_argument("--clusters", type=int, default=DEFAULT_CLUSTERS)
    args = parser.parse_args()
    gpus = faiss.get_num_gpus()
    if gpus == 0:
        raise SystemExit("faiss sees no GPU: install the gpu extra (faiss-gpu-cu12) on a CUDA machine")
    threads = faiss.omp_get_max_threads()
    print(f"pool {args.rows:,} x 128, faiss {faiss.__version__}, {gpus} GPU(s), {threads} CPU threads")
    print(f"{'task':<36} {'cpu s':>8} {'gpu s':>8} {'cpu/gpu':>8}  {'measure':<24} {'cpu':>7} {'gpu':>7}")
    for row in measure(args.rows, args.queries, args.clusters):
        speed = row["cpu_seconds"] / row["gpu_seconds"]
        print(
            f"{row['task']:<36} {row['cpu_seconds']:>8.2f} {row['gpu_seconds']:>8.2f} {speed:>8.1f}  "
            f"{row['measure']:<24} {row['cpu_value']:>7.4f} {row['gpu_value']:>7.4f}"
        )


if __name__ == "__main__":
    main()
