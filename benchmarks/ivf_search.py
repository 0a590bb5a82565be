"""Query-vs-pool cosine search: the IVF index lvd's knn module builds vs exact `IndexFlatIP`.

    nice python -m benchmarks.ivf_search [--rows 1000000] [--queries 10000] [--nprobe 1 2 4 ... 128]

The pool imitates SSL embeddings rather than well-separated blobs:
- many clusters (CLUSTERS) of Zipf-distributed sizes, grouped in GROUPS families whose members overlap;
- anisotropic spread: each cluster stretches along its own axes (a decaying spectrum, permuted per
  cluster, in a shared random basis), with a per-cluster overall scale;
- queries are perturbed pool points (seed images near pool images), so their true top-4 sit close
  together and close to the next neighbours; the difficulty line shows how close.
Recall@k is the share of the exact top-k that IVF finds. Index building is timed apart from search: the
retrieve stage builds once and searches every query shard. The sweep shows each nprobe's speed and
recall; the smallest nprobe meeting the goal (issue 4: recall@4 >= 0.95 at >= 5x exact) is set beside
the default the stages use for this pool size (`knn.ivf_probes`: a fixed share of the lists).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from curation.search.knn import build_index, ivf_lists, ivf_probes

DIM = 128
CLUSTERS = 5_000
GROUPS = 250
ZIPF_EXPONENT = 0.8  # cluster sizes ~ rank^-0.8: a few large modes, a long tail
GROUP_SPREAD = 0.6  # cluster centres around their group's centre: siblings overlap
CLUSTER_SPREAD = 0.55  # typical norm of a point's offset from its cluster centre
SCALE_JITTER = 0.3  # log-normal sigma of each cluster's overall spread
SPECTRUM_DECAY = 0.3  # axis j of a cluster has standard deviation ~ (j + 1)^-0.3: high intrinsic dim
# A query's offset from its pool point, in units of that point's cluster spread: 1 is a fresh draw around
# the point (a seed image of the same kind, not a near-copy), so cos@1 is about 0.86, not 0.99.
QUERY_SPREAD = 1.0
K = 4
RECALL_GOAL = 0.95
SPEED_GOAL = 5.0
SEED = 0
BATCH_ROWS = 100_000
DEFAULT_NPROBES = (1, 2, 4, 8, 16, 32, 64, 128)
DEFAULT_ROWS = 1_000_000
DEFAULT_QUERIES = 10_000


@dataclass(frozen=True, slots=True)
class Mixture:
    """The clusters' centres [C, d], anisotropic axis scales [C, d], shared basis [d, d] and weights [C]."""

    centres: np.ndarray
    scales: np.ndarray
    basis: np.ndarray
    weights: np.ndarray


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def make_mixture(rng: np.random.Generator) -> Mixture:
    groups = _unit(rng.normal(size=(GROUPS, DIM)))
    family = rng.integers(0, GROUPS, CLUSTERS)
    centres = _unit(groups[family] + GROUP_SPREAD * _unit(rng.normal(size=(CLUSTERS, DIM))))
    spectrum = (np.arange(DIM) + 1.0) ** -SPECTRUM_DECAY
    spectrum *= CLUSTER_SPREAD / np.sqrt((spectrum**2).sum())  # E|offset|^2 = CLUSTER_SPREAD^2
    axes = rng.permuted(np.tile(spectrum, (CLUSTERS, 1)), axis=1)  # each cluster's own long axes
    scales = axes * np.exp(SCALE_JITTER * rng.normal(size=(CLUSTERS, 1)))
    basis, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
    weights = (np.arange(CLUSTERS) + 1.0) ** -ZIPF_EXPONENT
    return Mixture(centres, scales, basis, weights / weights.sum())


def offsets(mixture: Mixture, clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Anisotropic offsets, one per entry of `clusters`, drawn from that cluster's spread."""
    return (rng.normal(size=(len(clusters), DIM)) * mixture.scales[clusters]) @ mixture.basis


def sample_pool(mixture: Mixture, num_rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """[num_rows, d] float32 unit vectors and the cluster of each."""
    clusters = rng.choice(CLUSTERS, num_rows, p=mixture.weights)
    pool = np.empty((num_rows, DIM), np.float32)
    for start in range(0, num_rows, BATCH_ROWS):
        part = clusters[start : start + BATCH_ROWS]
        pool[start : start + len(part)] = _unit(mixture.centres[part] + offsets(mixture, part, rng))
    return pool, clusters


def sample_queries(
    mixture: Mixture, pool: np.ndarray, clusters: np.ndarray, num_queries: int, rng: np.random.Generator
) -> np.ndarray:
    """Perturbed pool points: each query is a pool row moved by QUERY_SPREAD of its cluster's spread."""
    rows = rng.choice(len(pool), num_queries, replace=False)
    moved = pool[rows] + QUERY_SPREAD * offsets(mixture, clusters[rows], rng)
    return _unit(moved).astype(np.float32)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact, strict=True))
    return hits / exact.size


def difficulty(scores: np.ndarray) -> str:
    """How close the true neighbours are: median cosine at ranks 1, k and k+1, and the k / k+1 gap."""
    gap = scores[:, K - 1] - scores[:, K]
    return (
        f"median cos@1 {np.median(scores[:, 0]):.3f}, cos@{K} {np.median(scores[:, K - 1]):.3f}, "
        f"cos@{K + 1} {np.median(scores[:, K]):.3f}; gap cos@{K} - cos@{K + 1}: median {np.median(gap):.4f}, "
        f"{(gap < 0.01).mean():.0%} of queries under 0.01"
    )


def measure(
    rows: int = DEFAULT_ROWS, queries: int = DEFAULT_QUERIES, nprobes: Sequence[int] = DEFAULT_NPROBES
) -> dict[str, Any]:
    """Exact and IVF timings, and per nprobe: search seconds, speed-up over exact, recall@K, goal met."""
    rng = np.random.default_rng(SEED)
    mixture = make_mixture(rng)
    pool, clusters = sample_pool(mixture, rows, rng)
    query_rows = sample_queries(mixture, pool, clusters, queries, rng)

    started = time.perf_counter()
    flat = build_index(pool, "flat")
    flat_build = time.perf_counter() - started
    started = time.perf_counter()
    scores, exact = flat.search(query_rows, K + 1)
    exact_seconds = time.perf_counter() - started
    exact = exact[:, :K]

    started = time.perf_counter()
    ivf = build_index(pool, "ivf")  # what the retrieve stage builds for a large pool
    build_seconds = time.perf_counter() - started
    sweep = []
    for nprobe in nprobes:
        ivf.nprobe = nprobe
        started = time.perf_counter()
        _, found = ivf.search(query_rows, K)
        seconds = time.perf_counter() - started
        value, speed = recall(found, exact), exact_seconds / seconds
        ok = value >= RECALL_GOAL and speed >= SPEED_GOAL
        sweep.append({"nprobe": nprobe, "seconds": seconds, "speedup": speed, "recall": value, "met": ok})
    chosen = next((point["nprobe"] for point in sweep if point["met"]), None)
    return {
        "rows": rows,
        "queries": queries,
        "nlist": ivf_lists(rows),
        "flat_build_seconds": flat_build,
        "exact_seconds": exact_seconds,
        "ivf_build_seconds": build_seconds,
        "difficulty": difficulty(scores),
        "sweep": sweep,
        "smallest_nprobe_meeting_goal": chosen,
        "default_nprobe": ivf_probes(ivf_lists(rows)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--queries", type=int, default=DEFAULT_QUERIES)
    parser.add_argument("--nprobe", type=int, nargs="+", default=list(DEFAULT_NPROBES))
    args = parser.parse_args()
    result = measure(args.rows, args.queries, args.nprobe)
    print(
        f"pool {args.rows:,} x {DIM} ({CLUSTERS:,} anisotropic clusters in {GROUPS} overlapping families), "
        f"{args.queries:,} perturbed-pool-point queries, k = {K}, faiss threads {faiss.omp_get_max_threads()}"
    )
    flat_build, exact_seconds = result["flat_build_seconds"], result["exact_seconds"]
    print(f"exact IndexFlatIP: build {flat_build:.1f} s, search {exact_seconds:.2f} s")
    print(f"difficulty: {result['difficulty']}")
    print(f"IVF (lvd knn.build_index): nlist {result['nlist']}, build {result['ivf_build_seconds']:.1f} s")
    print(f"{'nprobe':>7} {'search s':>9} {'x exact':>8} {'recall@' + str(K):>9}  goal")
    for point in result["sweep"]:
        verdict = "met" if point["met"] else "-"
        timing = f"{point['nprobe']:>7} {point['seconds']:>9.3f} {point['speedup']:>8.1f}"
        print(f"{timing} {point['recall']:>9.4f}  {verdict}")
    chosen, default = result["smallest_nprobe_meeting_goal"], result["default_nprobe"]
    met_at = {point["nprobe"]: point["met"] for point in result["sweep"]}
    print(
        f"goal recall@{K} >= {RECALL_GOAL} at >= {SPEED_GOAL}x: "
        f"{f'met, smallest nprobe {chosen}' if chosen else 'MISSED'}; "
        f"default nprobe at this size {default}: "
        f"{'meets it' if met_at.get(default) else 'does not meet it' if default in met_at else 'not swept'}"
    )


if __name__ == "__main__":
    main()
