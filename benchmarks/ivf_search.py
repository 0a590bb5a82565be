"""Query-vs-pool cosine search: the IVF index lvd's knn module builds vs exact `IndexFlatIP`.

    nice python -m benchmarks.ivf_search [--rows 1000000] [--queries 10000] [--nprobe 8 16 32 64]

Vectors are random but clustered: unit vectors around CENTRES random unit centres with Gaussian noise,
queries drawn the same way (like seed images near the pool's modes). Recall@k is the share of the exact
top-k that IVF finds. Index building is timed apart from search: the retrieve stage builds once per seed
source and searches every query. Goal (issue 4): recall@4 >= 0.95 at >= 5x the exact search speed.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from curation.dedup.knn import build_index, ivf_lists, pool_index

DIM = 128
CENTRES = 2_000
NOISE = 0.6  # per-vector noise norm is about NOISE: cos to the centre ~0.86, clusters overlap
K = 4
RECALL_GOAL = 0.95
SPEED_GOAL = 5.0
SEED = 0
BATCH_ROWS = 100_000


def clustered(num_rows: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = np.empty((num_rows, centres.shape[1]), np.float32)
    for start in range(0, num_rows, BATCH_ROWS):
        stop = min(num_rows, start + BATCH_ROWS)
        rows = centres[rng.integers(0, len(centres), stop - start)]
        rows = rows + rng.normal(scale=NOISE / np.sqrt(centres.shape[1]), size=rows.shape)
        out[start:stop] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact, strict=True))
    return hits / exact.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    args = parser.parse_args()
    rng = np.random.default_rng(SEED)
    centres = rng.normal(size=(CENTRES, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    pool = clustered(args.rows, centres, rng)
    queries = clustered(args.queries, centres, rng)
    threads = faiss.omp_get_max_threads()
    print(f"pool {args.rows:,} x {DIM}, {args.queries:,} queries, k = {K}, faiss threads {threads}")

    started = time.perf_counter()
    flat = build_index(pool, "flat")
    flat_build = time.perf_counter() - started
    started = time.perf_counter()
    _, exact = flat.search(queries, K)
    exact_seconds = time.perf_counter() - started
    print(f"exact IndexFlatIP: build {flat_build:.1f} s, search {exact_seconds:.2f} s")

    started = time.perf_counter()
    ivf = pool_index(pool, "ivf")  # what the retrieve stage builds for a large pool
    build_seconds = time.perf_counter() - started
    print(f"IVF (lvd knn.build_index): nlist {ivf_lists(len(pool))}, build {build_seconds:.1f} s")
    met = False
    for nprobe in args.nprobe:
        ivf.nprobe = nprobe
        started = time.perf_counter()
        _, found = ivf.search(queries, K)
        seconds = time.perf_counter() - started
        value, speed = recall(found, exact), exact_seconds / seconds
        ok = value >= RECALL_GOAL and speed >= SPEED_GOAL
        met |= ok
        print(
            f"  nprobe {nprobe:4d}: search {seconds:.3f} s, {speed:6.1f}x exact, recall@{K} {value:.4f}"
            f"{'  (meets goal)' if ok else ''}"
        )
    print(f"goal recall@{K} >= {RECALL_GOAL} at >= {SPEED_GOAL}x: {'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
