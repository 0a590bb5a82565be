"""Faiss on the GPU: the stages' indexes and k-means give what the CPU gives (run by benchmarks/gpu_check.sh
after it installs the `gpu` extra's faiss-gpu-cu12; deselected by -m "not gpu")."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from curation.cluster import ClusterConfig, train_centroids
from curation.search import SearchConfig
from curation.search.knn import build_index, knn_search
from curation.search.sharded import database_index
from pipelines.executor import SerialExecutor

pytestmark = pytest.mark.gpu

ROWS, QUERIES, DIM, K = 50_000, 500, 64, 10
SCORE_TOLERANCE = 1e-4
# GPU and CPU kernels add in different orders: a near-tie at the k-th place may swap.
SAME_ROWS_SHARE = 0.999
CLUSTERS = 100


@pytest.fixture(autouse=True)
def needs_faiss_gpus():
    if faiss.get_num_gpus() == 0:
        pytest.fail("faiss sees no GPU: install the gpu extra (faiss-gpu-cu12) on a CUDA machine")


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(ROWS + QUERIES, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors[:ROWS], vectors[ROWS:]


def same_rows_share(found: np.ndarray, expected: np.ndarray) -> float:
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, expected, strict=True)])


def assert_finds_what_the_cpu_flat_index_finds(searcher, pool: np.ndarray, queries: np.ndarray) -> None:
    gpu_scores, gpu_rows = knn_search(searcher, queries, K)
    cpu_scores, cpu_rows = knn_search(build_index(pool, "flat"), queries, K)
    assert same_rows_share(gpu_rows, cpu_rows) >= SAME_ROWS_SHARE
    np.testing.assert_allclose(gpu_scores, cpu_scores, atol=SCORE_TOLERANCE)


def test_flat_search_on_gpus_equals_the_cpu_search(data):
    pool, queries = data
    gpu_index = build_index(pool, "flat", use_gpu=True)
    assert "Gpu" in type(gpu_index).__name__ or "Replicas" in type(gpu_index).__name__
    assert_finds_what_the_cpu_flat_index_finds(gpu_index, pool, queries)


def test_ivf_on_gpus_finds_as_much_of_the_exact_top_k_as_on_the_cpu(data):
    pool, queries = data
    _, exact = knn_search(build_index(pool, "flat"), queries, K)
    cpu = same_rows_share(knn_search(build_index(pool, "ivf"), queries, K)[1], exact)
    gpu = same_rows_share(knn_search(build_index(pool, "ivf", use_gpu=True), queries, K)[1], exact)
    assert gpu >= cpu - 0.01, (gpu, cpu)


def test_two_gpu_shards_merge_to_the_one_cpu_index(data):
    pool, queries = data
    search = SearchConfig(index="flat", shards=2, use_gpu=True)
    with database_index(pool, search, SerialExecutor()) as sharded:
        assert_finds_what_the_cpu_flat_index_finds(sharded, pool, queries)


def test_kmeans_on_gpus_fits_as_well_as_on_the_cpu(data):
    pool, _ = data

    def mean_cosine_to_nearest(centroids: np.ndarray) -> float:
        return float((pool @ centroids.T).max(axis=1).mean())

    cpu = mean_cosine_to_nearest(train_centroids(pool, CLUSTERS, ClusterConfig(use_gpu=False)))
    gpu = mean_cosine_to_nearest(train_centroids(pool, CLUSTERS, ClusterConfig(use_gpu=True)))
    assert abs(gpu - cpu) < 0.01 * cpu, (gpu, cpu)
