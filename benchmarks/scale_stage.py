"""One stage step of benchmarks/scale_memory.py in this process: its peak RSS, seconds and stats, as JSON.

    python benchmarks/scale_stage.py '<job json>'

Run as a script (not `-m`) so that PYTHONPATH chooses the lvd tree it measures: this repository, or a
worktree of an older commit (`"api": "baseline"`: the stage steps as they stood there, before the drivers
were partitioned). It imports nothing from `benchmarks` for that reason.

    phash_graph  phash_dedup after hashing: search, components, keep rule, outputs
    copy_graph   copy_dedup after describing: index, probe, k-NN graph, keep rule, outputs
    cluster      the cluster stage (run_stage)
    retrieve     the retrieve stage (run_stage), on the cluster run the `cluster` step committed
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import curation  # noqa: F401  (registers the stages)
from curation.cluster import CLUSTER, ClusterConfig
from curation.dedup.copy import COPY_DEDUP, PAPER_COPY_THRESHOLD, CopyDedupConfig
from curation.dedup.phash import IMAGE_HASHES, PHASH_DEDUP, PhashDedupConfig
from curation.retrieve import RETRIEVE, RetrievalSourceConfig, RetrieveConfig
from curation.search import SearchConfig
from pipelines.executor import SerialExecutor
from pipelines.manifest import IMAGES, read_manifest
from pipelines.stage import Manifest, StageContext, run_stage
from pipelines.store import Store

STATUS = Path("/proc/self/status")
KIB = 1024
CLUSTERS = 1024
CLUSTER_ITERATIONS = 10
SEED_SOURCE = "seeds"
NEIGHBOURS_PER_SEED = 4
MAX_HASH_DISTANCE = 2


def peak_rss_mib() -> float:
    """VmHWM: this process image's own high-water mark (see benchmarks/peak_memory.py)."""
    for line in STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / KIB
    raise RuntimeError("no VmHWM in /proc/self/status")


def search_config(job: dict) -> SearchConfig:
    """The compressed IVF index of the current code, or the IVF-flat one of the baseline (no other); with
    `index_shards`, the index split over Ray actors outside this process (`search.shards`)."""
    index = "ivf" if job["api"] == "baseline" else "ivfsq"
    settings = {"sq_bits": job["sq_bits"], "ivf_lists": job["ivf_lists"]} if index == "ivfsq" else {}
    shards = job.get("index_shards", 1)
    return SearchConfig(index=index, ivf_nprobe=job["nprobe"], use_gpu=False, shards=shards, **settings)


def executor(job: dict):
    """Serial, or Ray workers on the cluster at `ray_address` (its actors hold the index shards)."""
    if not job.get("ray_address"):
        return SerialExecutor()
    from pipelines.executor import RayExecutor

    return RayExecutor(num_workers=job["index_shards"], address=job["ray_address"])


def manifest(job: dict, name: str, schema_name: str) -> Manifest:
    return Manifest(f"{job['data']}/{name}", schema_name, f"scale-{name}-{job['rows']}", job["rows"])


def context(spec, job: dict) -> StageContext:
    return StageContext(spec, f"scale-{job['rows']}", Store(job["store"]), executor(job), show_progress=False)


def phash_graph(job: dict) -> dict[str, Any]:
    cfg = PhashDedupConfig(max_distance=MAX_HASH_DISTANCE)
    ctx = context(PHASH_DEDUP, job)
    hashes_uri = f"{job['data']}/hashes"
    if job["api"] != "baseline":
        from curation.dedup.phash import dedup_stored_hashes

        return dedup_stored_hashes(cfg, manifest(job, "images", "images"), hashes_uri, ctx)
    from curation.dedup.phash import aligned_hashes, dedup_by_hash  # the code before key ranges

    images = read_manifest(f"{job['data']}/images", IMAGES)
    hashes = aligned_hashes(images, read_manifest(hashes_uri, IMAGE_HASHES))
    result = dedup_by_hash(images, hashes, cfg.max_distance, cfg.keep)
    ctx.write_output("images", images.filter(result.resolution.keep))
    ctx.write_output("rejected", result.rejected)
    return {"rejected": result.rejected.num_rows, "pairs": len(result.pairs)}


def copy_graph(job: dict) -> dict[str, Any]:
    cfg = CopyDedupConfig(
        threshold=PAPER_COPY_THRESHOLD, score_normalization=False, search=search_config(job)
    )
    ctx = context(COPY_DEDUP, job)
    descriptors_uri = f"{job['data']}/descriptors"
    if job["api"] != "baseline":
        from curation.dedup.copy import dedup_stored_descriptors

        stats = dedup_stored_descriptors(cfg, manifest(job, "images", "images"), descriptors_uri, None, ctx)
        return {key: stats[key] for key in ("rejected", "edges", "index", "knn_seconds", "groups")}
    # The code before key ranges: the images table, keys aligned by a join, the keep rule in memory.
    from curation.dedup.components import duplicate_rejections, resolve_groups
    from curation.dedup.graph import locate_descriptors, pair_cosines
    from curation.dedup.probe import probed_graph

    images = read_manifest(f"{job['data']}/images", IMAGES)
    descriptors = locate_descriptors(images, descriptors_uri)
    roles = np.asarray(images.column("role").to_pylist(), dtype=object)
    in_scope = np.isin(roles, list(cfg.roles))
    scope = np.flatnonzero(in_scope)
    _, graph = probed_graph(images, descriptors, scope, scope, in_scope, cfg, None, SerialExecutor())
    resolution = resolve_groups(images, graph.labels, cfg.keep)
    dropped = np.flatnonzero(~resolution.keep)
    match = resolution.match[dropped]
    similarity = pair_cosines(descriptors, dropped, match)
    rejected = duplicate_rejections(
        images, dropped, match, resolution.representative[dropped], similarity, "copy"
    )
    ctx.write_output("images", images.filter(resolution.keep))
    ctx.write_output("rejected", rejected)
    return {
        "rejected": len(dropped),
        "edges": graph.edges,
        "index": graph.index,
        "knn_seconds": graph.seconds,
    }


def cluster_run(job: dict):
    cfg = ClusterConfig(num_clusters=CLUSTERS, num_iterations=CLUSTER_ITERATIONS, use_gpu=False)
    embeddings = manifest(job, "embeddings", "embeddings")
    return run_stage(CLUSTER, cfg, {"embeddings": embeddings}, store=Store(job["store"]), show_progress=False)


def cluster(job: dict) -> dict[str, Any]:
    stats = cluster_run(job).record["stats"]
    return {key: stats[key] for key in ("rows", "clusters", "training_rows", "seconds")}


def retrieve(job: dict) -> dict[str, Any]:
    clustered = cluster_run(job)  # committed by the `cluster` step: reused, not measured again
    assert clustered.reused, "run the cluster step first"
    started_rss = peak_rss_mib()
    source = RetrievalSourceConfig(source=SEED_SOURCE, num_neighbours=NEIGHBOURS_PER_SEED)
    cfg = RetrieveConfig(sources=(source,), search=search_config(job))
    inputs = {
        "embeddings": manifest(job, "embeddings", "embeddings"),
        "assignments": clustered.outputs["assignments"],
        "centroids": clustered.outputs["centroids"],
    }
    run = run_stage(
        RETRIEVE, cfg, inputs, store=Store(job["store"]), executor=executor(job), show_progress=False
    )
    stats = run.record["stats"]
    return {"pool_rows": stats["pool_rows"], "rows": stats["rows"], "rss_before_mib": started_rss}


STEPS = {"phash_graph": phash_graph, "copy_graph": copy_graph, "cluster": cluster, "retrieve": retrieve}


def main(job: dict) -> None:
    started = time.perf_counter()
    stats = STEPS[job["stage"]](job)
    seconds = time.perf_counter() - started
    result = {
        "stage": job["stage"],
        "api": job["api"],
        "rows": job["rows"],
        "seconds": round(seconds, 1),
        "rows_per_second": round(job["rows"] / seconds),
        "peak_rss_mib": round(peak_rss_mib()),
        "stats": stats,
    }
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
