"""Stage drivers at scale: phash_dedup's and copy_dedup's graph steps, cluster and retrieve on 20M synthetic
rows, each in its own process under a memory cap, beside the same steps of the code before key ranges.

    nice python -m benchmarks.scale_memory [--rows 20000000] [--baseline-rows 2000000] [--cap-mib 3072]
                                           [--stages phash_graph,copy_graph,cluster,retrieve] [--work DIR]

Input, made on disk a part at a time (never all rows in memory), without images: `images`, `hashes`
(64-bit, COPY_SHARE of them 0-2 bits from an earlier row of their part), `descriptors` (DIM float16, as
many near copies, cosine about 0.89) and `embeddings` (the same vectors, plus SEED_SHARE seed rows of
source "seeds" for retrieval). Parts hold PART_ROWS rows in key order with disjoint ranges, named by
content (file-name order is not key order), as lvd's stages write them.

Each step (benchmarks/scale_stage.py) runs in a process of its own inside a cgroup-v1 memory cgroup of
`--cap-mib` (a process over it is killed): the current code at `--rows` and at `--baseline-rows`, and the
code of `--baseline-commit` (a git worktree) at `--baseline-rows`, uncapped. With `--ray-address` (a Ray
cluster started outside the cap, e.g. `ray start --head`) and `--index-shards N`, the current code's copy
graph and retrieve keep their IVF index on N Ray actors (`search.shards`), as a cluster would. Printed:
peak RSS (VmHWM) and rows per second per step, the ratios, and each driver's marginal bytes per row
between the two sizes (what docs/scale.md projects to 1.2B rows).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

import curation  # noqa: F401  (registers the stages)
from curation.dedup.descriptors import DESCRIPTORS
from curation.dedup.phash import IMAGE_HASHES
from curation.embed import EMBEDDINGS
from curation.vectors import embedding_array
from pipelines.manifest import IMAGES, part_name
from pipelines.store import Store

REPO = Path(__file__).resolve().parents[1]
CHILD = REPO / "benchmarks" / "scale_stage.py"
DEFAULT_ROWS = 20_000_000
DEFAULT_BASELINE_ROWS = 2_000_000
DEFAULT_CAP_MIB = 3072
BASELINE_COMMIT = "ed94aa7"  # the last commit before the partitioned drivers
STEPS = ("phash_graph", "copy_graph", "cluster", "retrieve")
PART_ROWS = 65_536
DIM = 128
COPY_SHARE = 0.2
COPY_NOISE = 0.5  # offset norm of a copy from its original: cosine about 1 / sqrt(1 + 0.5^2) = 0.89
MAX_FLIPS = 2
SEED_SHARE = 1 / 200
SEED_NOISE = 1.0
HASH_BITS = 64
# The compressed index at 20M rows: 4-bit codes (64 B a row at 128-d), 4,096 lists (their k-means trains
# in about a minute here), 2 probes (the graph's 20M queries in minutes on 2 cores; recall is not
# what this benchmark measures).
SQ_BITS = 4
IVF_LISTS = 4096
NPROBE = 2
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
MIB = 1 << 20
KILLED = 137
SEED = 0


def _part_id(first: str, last: str) -> str:
    return hashlib.sha256(f"{first}|{last}".encode()).hexdigest()[:16]


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _with_copies(rng: np.random.Generator, originals: np.ndarray, make_copy) -> np.ndarray:
    """COPY_SHARE of the rows replaced by `make_copy` of an earlier row of the same part."""
    rows = np.flatnonzero(rng.random(len(originals)) < COPY_SHARE)
    rows = rows[rows > 0]
    sources = (rng.random(len(rows)) * rows).astype(np.int64)  # an earlier row
    out = originals.copy()
    out[rows] = make_copy(originals[sources], rng)
    return out


def _near_copy(noise: float, originals: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit rows plus a random offset of norm `noise`: cosine 1 / sqrt(1 + noise^2) after normalising."""
    return originals + noise * _unit(rng.normal(size=originals.shape))


def _flip_bits(hashes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = hashes.copy()
    for _ in range(MAX_FLIPS):
        flip = rng.random(len(out)) < 0.5
        out[flip] ^= np.left_shift(
            np.uint64(1), rng.integers(0, HASH_BITS, int(flip.sum())).astype(np.uint64)
        )
    return out


def _part_tables(first_row: int, count: int, seed_rows: bool) -> dict[str, pa.Table]:
    rng = np.random.default_rng([SEED, first_row, int(seed_rows)])
    rows = np.arange(first_row, first_row + count)
    prefix = "f" if seed_rows else ""  # seed keys sort after every pool key
    ids = [f"{prefix}{row:0{64 - len(prefix)}x}" for row in rows]
    uris = [f"/nonexistent/{'seeds' if seed_rows else 'pool'}/{row:012d}.jpg" for row in rows]
    noise = SEED_NOISE if seed_rows else COPY_NOISE
    vectors = _with_copies(rng, _unit(rng.normal(size=(count, DIM))), functools.partial(_near_copy, noise))
    column = embedding_array(_unit(vectors))
    source, role = ("seeds", "curated") if seed_rows else ("pool", "uncurated")
    keys = {"image_id": pa.array(ids), "uri": pa.array(uris)}
    tables = {
        "embeddings": pa.table(
            {**keys, "source": [source] * count, "role": [role] * count, "embedding": column}
        )
    }
    if seed_rows:
        return tables
    hashes = _with_copies(rng, rng.integers(0, np.iinfo(np.uint64).max, count, dtype=np.uint64), _flip_bits)
    side = rng.choice([256, 320, 384], count)
    tables["hashes"] = pa.table({**keys, "hash": pa.array(hashes, pa.uint64())})
    tables["descriptors"] = pa.table({**keys, "descriptor": column})
    tables["images"] = pa.table(
        {
            **keys,
            "source": [source] * count,
            "role": [role] * count,
            "container": ["file"] * count,
            "byte_offset": pa.nulls(count, pa.int64()),
            "byte_size": pa.array(rng.integers(10_000, 60_000, count)),
            "width": pa.array(side, pa.int32()),
            "height": pa.array(side, pa.int32()),
            "format": ["JPEG"] * count,
            "mode": ["RGB"] * count,
            "num_frames": pa.array(np.ones(count, np.int32)),
        }
    )
    return tables


SCHEMAS = {"images": IMAGES, "hashes": IMAGE_HASHES, "descriptors": DESCRIPTORS, "embeddings": EMBEDDINGS}


def generate(folder: Path, num_rows: int) -> Path:
    """The four manifests of `num_rows` pool rows under `folder` (reused when complete)."""
    done = folder / "_DONE.json"
    if done.exists():
        return folder
    store = Store(folder)
    seed_rows = max(1, int(num_rows * SEED_SHARE))
    plan = [(start, min(PART_ROWS, num_rows - start), False) for start in range(0, num_rows, PART_ROWS)]
    plan += [(start, min(PART_ROWS, seed_rows - start), True) for start in range(0, seed_rows, PART_ROWS)]
    for first_row, count, seeds in tqdm(plan, desc=f"synthetic {num_rows:,} rows", unit="part"):
        for name, table in _part_tables(first_row, count, seeds).items():
            ids = table.column("image_id")
            part = part_name(_part_id(ids[0].as_py(), ids[-1].as_py()))
            store.write_table_atomic(f"{folder}/{name}/{part}", SCHEMAS[name].validate(table))
    done.write_text(json.dumps({"rows": num_rows, "seed_rows": seed_rows}))
    return folder


def baseline_tree(work: Path, commit: str) -> Path:
    tree = work / f"baseline-{commit}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit], check=True)
    return tree


def run_step(job: dict[str, Any], tree: Path, cap_mib: int | None) -> dict[str, Any]:
    """One step in its own process under PYTHONPATH=`tree`, inside a memory cgroup of `cap_mib`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = ["nice", sys.executable, str(CHILD), json.dumps(job)]
    group = CGROUP_ROOT / f"lvd-scale-{uuid.uuid4().hex[:8]}" if cap_mib else None
    try:
        if group is not None:
            group.mkdir()
            (group / "memory.limit_in_bytes").write_text(str(cap_mib * MIB))
            command = ["sh", "-c", f'echo $$ > {group}/cgroup.procs; exec "$@"', "sh", *command]
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
        usage = int((group / "memory.max_usage_in_bytes").read_text()) / MIB if group is not None else None
    finally:
        if group is not None and group.exists():
            group.rmdir()
    if done.returncode in (KILLED, -signal.SIGKILL):  # through the shell, or the process itself
        return {"stage": job["stage"], "killed_at_cap": True, "cgroup_max_mib": usage}
    if done.returncode != 0:
        raise RuntimeError(f"{job['stage']} ({job['api']}) failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "cgroup_max_mib": usage}


def can_cap() -> bool:
    probe = CGROUP_ROOT / f"lvd-scale-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
        probe.rmdir()
        return True
    except OSError:
        return False


def measure(
    rows: int = DEFAULT_ROWS,
    baseline_rows: int = DEFAULT_BASELINE_ROWS,
    cap_mib: int = DEFAULT_CAP_MIB,
    steps: tuple[str, ...] = STEPS,
    work: Path | None = None,
    baseline_commit: str = BASELINE_COMMIT,
    ray_address: str | None = None,
    index_shards: int = 1,
) -> dict[str, Any]:
    work = work or REPO / "build" / "scale"
    capped = can_cap()
    if not capped:
        print("warning: no writable cgroup-v1 memory controller: the cap is NOT enforced", file=sys.stderr)
    runs: dict[str, dict[str, Any]] = {}
    plan = [
        ("baseline", baseline_rows, baseline_tree(work, baseline_commit), None),
        ("current", baseline_rows, REPO, cap_mib),
    ]
    if rows != baseline_rows:
        plan.append(("current", rows, REPO, cap_mib))
    for api, size, tree, cap in plan:
        data = generate(work / f"data-{size}", size)
        store = work / f"store-{api}-{size}-{uuid.uuid4().hex[:6]}"
        for step in steps:
            job = {"stage": step, "api": api, "rows": size, "data": str(data), "store": str(store)}
            job.update(sq_bits=SQ_BITS, ivf_lists=IVF_LISTS, nprobe=NPROBE)
            if api == "current" and ray_address:  # the index on Ray actors, outside the cap
                job.update(ray_address=ray_address, index_shards=index_shards)
            runs[f"{api}-{size}-{step}"] = run_step(job, tree, cap if capped else None)
            print(json.dumps(runs[f"{api}-{size}-{step}"]), flush=True)
    result = {
        "rows": rows,
        "baseline_rows": baseline_rows,
        "cap_mib": cap_mib if capped else None,
        "runs": runs,
    }
    (work / "scale_results.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def bytes_per_row(small: dict, large: dict, small_rows: int, large_rows: int) -> float | None:
    """The driver's marginal memory per row between two sizes (peak RSS difference / rows added)."""
    if "peak_rss_mib" not in small or "peak_rss_mib" not in large or large_rows == small_rows:
        return None
    return (large["peak_rss_mib"] - small["peak_rss_mib"]) * MIB / (large_rows - small_rows)


def report(result: dict[str, Any], steps: tuple[str, ...] = STEPS) -> str:
    rows, base = result["rows"], result["baseline_rows"]
    runs = result["runs"]
    old = f"{BASELINE_COMMIT} at {base:,}"
    lines = [
        f"| step | {old}: peak MiB, rows/s | now at {base:,}: peak MiB, rows/s, ratio to {old} "
        f"| now at {rows:,} (cap {result['cap_mib']} MiB): peak MiB, cgroup max MiB, rows/s, ratio to {old} "
        "| driver bytes/row now |",
        "|---|---|---|---|---|",
    ]
    for step in steps:
        old = runs.get(f"baseline-{base}-{step}", {})
        now = runs.get(f"current-{base}-{step}", {})
        big = runs.get(f"current-{rows}-{step}", now)
        cells = [step, _cell(old), _cell(now, old), _cell(big, old, usage=True)]
        per_row = bytes_per_row(now, big, base, rows)
        cells.append("" if per_row is None else f"{per_row:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(run: dict, against: dict | None = None, usage: bool = False) -> str:
    if run.get("killed_at_cap"):
        return "killed at the cap"
    if "peak_rss_mib" not in run:
        return ""
    text = f"{run['peak_rss_mib']:,}"
    if usage and run.get("cgroup_max_mib") is not None:
        text += f", {run['cgroup_max_mib']:,.0f}"
    text += f", {run['rows_per_second']:,}/s"
    if against and "peak_rss_mib" in against:
        text += f", {run['peak_rss_mib'] / against['peak_rss_mib']:.2f}x"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--baseline-rows", type=int, default=DEFAULT_BASELINE_ROWS)
    parser.add_argument("--cap-mib", type=int, default=DEFAULT_CAP_MIB)
    parser.add_argument("--stages", default=",".join(STEPS))
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--baseline-commit", default=BASELINE_COMMIT)
    parser.add_argument(
        "--ray-address",
        default=None,
        help="a Ray cluster (started outside the cap) whose actors hold the index",
    )
    parser.add_argument(
        "--index-shards", type=int, default=1, help="search.shards of the copy graph and retrieve"
    )
    args = parser.parse_args()
    steps = tuple(args.stages.split(","))
    result = measure(
        args.rows,
        args.baseline_rows,
        args.cap_mib,
        steps,
        args.work,
        args.baseline_commit,
        args.ray_address,
        args.index_shards,
    )
    print(report(result, steps))


if __name__ == "__main__":
    main()
