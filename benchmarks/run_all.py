"""Every benchmark beside its baseline, summed up in one table (what `make bench` prints).

    python -m benchmarks.run_all            # quick sizes: minutes on 2 cores
    python -m benchmarks.run_all --full     # the sizes each benchmark documents (phash at 100k alone
                                            # keeps imagededup busy for about 40 minutes on 2 cores)

Each benchmark module's `measure(...)` returns its figures as a dict; this runner turns them into rows
(benchmark, lvd figure, baseline figure, ratio, goal, met?). Goals come from the issues that asked for
each benchmark (ingest, asked for its figures only, must at least gain from Ray); "lvd" is what lvd runs,
"baseline" what it is compared with. On a shared machine a busy spell can fail a timing goal: rerun
with --only. A benchmark that fails leaves an error row and the exit status 1; the others still run.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks import (
    bounded_memory,
    copy_descriptor,
    data_pipeline,
    ingest_throughput,
    ivf_search,
    kmeans_overhead,
    multi_student,
    phash_search,
    scale_memory,
    train_step,
)
from curation.search.knn import ivf_lists, ivf_probes

INGEST_SPEEDUP_GOAL = 1.0  # Ray's 2 workers must beat the serial executor (issue 2 asked for the figure)
PHASH_SPEEDUP_GOAL = 10.0  # issue 3, at 100k hashes
BALANCE_MEMORY_GOAL = 1.2  # issue 18: the balance stage holds about what the cluster stage holds
KMEANS_OVERHEAD_GOAL = kmeans_overhead.OVERHEAD_GOAL
TRAIN_STEP_GOAL = 1.0  # the sample-subsetting trick must cost neither time nor memory
OFFICIAL_STEP_TIME_GOAL = 0.8  # issue 17: at least 20% faster than the official step on the same work
OFFICIAL_STEP_MEMORY_GOAL = 1.0
LOADER_GOAL = 1.0
MULTI_STUDENT_GOAL = 1.0  # issue 18: one teacher forward per batch for all students beats separate runs
# The trained copy descriptor runs EfficientNet-Lite0's trunk too; GeM and a 512-d projection add little.
DESCRIPTOR_SPEED_GOAL = 0.9
IVF_QUICK_ROWS = 500_000
QUICK = {
    "ingest": {"repeats": 2},
    "phash": {"sizes": (10_000,), "repeats": 3},
    "kmeans": {},  # its goal is set at its default size; smaller ones weigh the fixed costs more
    "ivf": {"rows": IVF_QUICK_ROWS, "queries": 2_000, "nprobes": (ivf_probes(ivf_lists(IVF_QUICK_ROWS)),)},
    "train_step": {"steps": 2, "variants": ("lvd", "no-subset", "official", "official-dp0"), "repeats": 2},
    "data_pipeline": {"batches": 16, "repeats": 1},
    "bounded_memory": {"rows": 400_000},
    "copy_descriptor": {"images": 256, "repeats": 2},
    "multi_student": {"steps": 10},
    # issue 19's quick variant: the current drivers at 2M rows beside the old ones at 2M (the full size
    # runs them at 20M too)
    "scale": {"rows": scale_memory.DEFAULT_BASELINE_ROWS},
}
FULL: dict[str, dict[str, Any]] = {name: {} for name in QUICK}  # each benchmark's own defaults


@dataclass(frozen=True, slots=True)
class Row:
    benchmark: str
    lvd: str
    baseline: str
    ratio: str
    goal: str
    met: bool | None  # None: the benchmark failed


def ingest_rows(options: dict[str, Any]) -> list[Row]:
    found = ingest_throughput.measure(**options)
    speedup = found["speedup"]
    return [
        Row(
            f"ingest, demo pool ({found['inputs']:,} inputs): Ray x{found['workers']} vs serial",
            f"{found['ray_images_per_s']:,.0f} img/s",
            f"{found['serial_images_per_s']:,.0f} img/s",
            f"{speedup:.2f}x",
            f"> {INGEST_SPEEDUP_GOAL:g}x",
            speedup > INGEST_SPEEDUP_GOAL,
        )
    ]


def phash_rows(options: dict[str, Any]) -> list[Row]:
    return [
        Row(
            f"phash search, {size['hashes']:,} hashes: lvd vs imagededup",
            f"{size['lvd_seconds']:.3f} s",
            f"{size['imagededup_seconds']:.1f} s",
            f"{size['ratio']:,.0f}x faster" + ("" if size["equal"] else " (pairs DIFFER)"),
            f">= {PHASH_SPEEDUP_GOAL:g}x, same pairs",
            size["ratio"] >= PHASH_SPEEDUP_GOAL and size["equal"],
        )
        for size in phash_search.measure(**options)["sizes"]
    ]


def kmeans_rows(options: dict[str, Any]) -> list[Row]:
    found = kmeans_overhead.measure(**options)
    return [
        Row(
            f"k-means stage vs raw faiss ({found['rows']:,} rows, k {found['clusters']:,}; shared training)",
            f"{found['paired_stage_seconds']:.2f} s",
            f"{found['paired_raw_seconds']:.2f} s",
            f"{found['ratio']:.3f} paired ({found['end_to_end_ratio']:.3f} end to end)",
            f"<= {KMEANS_OVERHEAD_GOAL:g}",
            found["ratio"] <= KMEANS_OVERHEAD_GOAL,
        )
    ]


def ivf_rows(options: dict[str, Any]) -> list[Row]:
    found = ivf_search.measure(**options)
    point = next(
        (point for point in found["sweep"] if point["nprobe"] == found["default_nprobe"]), found["sweep"][-1]
    )
    scope = f"{found['rows']:,} pool, nprobe {point['nprobe']}"
    return [
        Row(
            f"IVF vs flat search speed ({scope})",
            f"{point['seconds']:.3f} s",
            f"{found['exact_seconds']:.3f} s",
            f"{point['speedup']:.1f}x faster",
            f">= {ivf_search.SPEED_GOAL:g}x",
            point["speedup"] >= ivf_search.SPEED_GOAL,
        ),
        Row(
            f"IVF vs flat recall@{ivf_search.K} ({scope})",
            f"{point['recall']:.4f}",
            "1 (exact)",
            f"{point['recall']:.4f}",
            f">= {ivf_search.RECALL_GOAL:g}",
            point["recall"] >= ivf_search.RECALL_GOAL,
        ),
    ]


VARIANT_RATES = {name: options["drop_path_rate"] for name, options in train_step.VARIANTS.items()}


def train_step_rows(options: dict[str, Any]) -> list[Row]:
    rows = []
    for arch, variants in train_step.measure(**options).items():
        ours, theirs = variants["lvd"], variants["no-subset"]
        time_ratio = ours["seconds_per_step"] / theirs["seconds_per_step"]
        memory_ratio = ours["peak_mib"] / theirs["peak_mib"]
        rows += [
            Row(
                f"train step {arch} (CPU, batch {train_step.DEFAULT_BATCH}): lvd vs no-subset, time",
                f"{ours['seconds_per_step']:.2f} s/step",
                f"{theirs['seconds_per_step']:.2f} s/step",
                f"{time_ratio:.2f}",
                f"<= {TRAIN_STEP_GOAL:g}",
                time_ratio <= TRAIN_STEP_GOAL,
            ),
            Row(
                f"train step {arch}: lvd vs no-subset, peak memory",
                f"{ours['peak_mib']:,.0f} MiB",
                f"{theirs['peak_mib']:,.0f} MiB",
                f"{memory_ratio:.2f}",
                f"<= {TRAIN_STEP_GOAL:g}",
                memory_ratio <= TRAIN_STEP_GOAL,
            ),
        ]
        for mine, official in train_step.OFFICIAL_PAIRS.items():
            if official in variants:
                rows += official_step_rows(arch, variants[mine], variants[official], VARIANT_RATES[mine])
    return rows


def official_step_rows(arch: str, mine: dict, official: dict, drop_path_rate: float) -> list[Row]:
    """lvd's step against the official code's on the same work (issue 17's goal)."""
    time_ratio = mine["seconds_per_step"] / official["seconds_per_step"]
    memory_ratio = mine["peak_mib"] / official["peak_mib"]
    scope = f"train step {arch} (CPU, batch {train_step.DEFAULT_BATCH}, drop_path {drop_path_rate:g})"
    return [
        Row(
            f"{scope}: lvd vs official, time",
            f"{mine['seconds_per_step']:.2f} s/step",
            f"{official['seconds_per_step']:.2f} s/step",
            f"{time_ratio:.2f}",
            f"<= {OFFICIAL_STEP_TIME_GOAL:g}",
            time_ratio <= OFFICIAL_STEP_TIME_GOAL,
        ),
        Row(
            f"{scope}: lvd vs official, peak memory",
            f"{mine['peak_mib']:,.0f} MiB",
            f"{official['peak_mib']:,.0f} MiB",
            f"{memory_ratio:.2f}",
            f"<= {OFFICIAL_STEP_MEMORY_GOAL:g}",
            memory_ratio <= OFFICIAL_STEP_MEMORY_GOAL,
        ),
    ]


def data_pipeline_rows(options: dict[str, Any]) -> list[Row]:
    found = data_pipeline.measure(**options)
    return [
        Row(
            f"data loader, {point['num_workers']} workers ({found['images']} images): lvd vs official style",
            f"{point['lvd']:.1f} img/s",
            f"{point['official']:.1f} img/s",
            f"{point['ratio']:.2f}x",
            f">= {LOADER_GOAL:g}x",
            point["ratio"] >= LOADER_GOAL,
        )
        for point in found["by_workers"]
    ]


def bounded_memory_rows(options: dict[str, Any]) -> list[Row]:
    """Goal: streaming saves at least one float32 copy of all the vectors (N x d x 4 bytes), the copy the
    all-at-once run holds beside the float16 column. Below ~400k rows the fixed costs (allocator pools,
    read buffers, the training sample) are as large as that copy, hence the quick size."""
    found = bounded_memory.measure(**options)
    runs, copy_mib = found["runs"], found["theory_mib"]["float32_matrix"]
    size = f"{found['rows']:,} x {found['dim']}"
    rows = []
    for name, label, same in (
        ("kmeans", "k-means assignment", found["same_clusters"]),
        ("graph", "dedup graph", found["same_components"]),
    ):
        streamed, at_once = runs[f"{name}_streamed"]["peak_mib"], runs[f"{name}_at_once"]["peak_mib"]
        rows.append(
            Row(
                f"peak RSS, {label} ({size}): streamed vs at once",
                f"{streamed:,.0f} MiB",
                f"{at_once:,.0f} MiB",
                f"{streamed / at_once:.2f}" + ("" if same else " (results DIFFER)"),
                f"saves >= {copy_mib:,.0f} MiB, same result",
                at_once - streamed >= copy_mib and same,
            )
        )
    balance, flat = runs["balance_streamed"]["peak_mib"], runs["kmeans_streamed"]["peak_mib"]
    rows.append(
        Row(
            f"peak RSS, hierarchical k-means + balanced sample (balance) vs the cluster stage ({size})",
            f"{balance:,.0f} MiB",
            f"{flat:,.0f} MiB",
            f"{balance / flat:.2f}",
            f"<= {BALANCE_MEMORY_GOAL:g}x",
            balance / flat <= BALANCE_MEMORY_GOAL,
        )
    )
    return rows


def scale_rows(options: dict[str, Any]) -> list[Row]:
    """Goal (issue 19): every step completes under the memory cap, holding no more than the driver before
    key ranges held at the baseline size."""
    found = scale_memory.measure(**options)
    rows, base, cap = found["rows"], found["baseline_rows"], found["cap_mib"]
    result = []
    for step in scale_memory.STEPS:
        old = found["runs"][f"baseline-{base}-{step}"]
        new = found["runs"][f"current-{rows}-{step}"]
        killed = new.get("killed_at_cap", False)
        ratio = None if killed else new["peak_rss_mib"] / old["peak_rss_mib"]
        versus = f"{scale_memory.BASELINE_COMMIT} at {base:,}"
        result.append(
            Row(
                f"peak RSS, {step} at {rows:,} rows (cap {cap} MiB) vs {versus}",
                "killed at the cap"
                if killed
                else f"{new['peak_rss_mib']:,} MiB, {new['rows_per_second']:,} rows/s",
                f"{old['peak_rss_mib']:,} MiB, {old['rows_per_second']:,} rows/s",
                "-" if ratio is None else f"{ratio:.2f}",
                "under the cap" + (", <= 1x" if rows == base else ""),
                not killed and (rows != base or ratio <= 1.0),
            )
        )
    return result


def multi_student_rows(options: dict[str, Any]) -> list[Row]:
    found = multi_student.measure(**options)
    students = ", ".join(found["students"])
    return [
        Row(
            f"distilling {students} in one run vs separate runs ({found['teacher']} teacher, "
            f"{found['steps']} steps, CPU)",
            f"{found['together_seconds']:.1f} s",
            f"{found['separate_seconds']:.1f} s",
            f"{found['ratio']:.2f}",
            f"< {MULTI_STUDENT_GOAL:g}",
            found["ratio"] < MULTI_STUDENT_GOAL,
        )
    ]


def copy_descriptor_rows(options: dict[str, Any]) -> list[Row]:
    found = copy_descriptor.measure(**options)
    scope = f"{found['images']} images, CPU"
    return [
        Row(
            f"copy descriptor vs EfficientNet-Lite0 features, 224 px ({scope})",
            f"{found['descriptor_224']:.1f} img/s",
            f"{found['features_224']:.1f} img/s",
            f"{found['ratio_224']:.2f}x",
            f">= {DESCRIPTOR_SPEED_GOAL:g}x",
            found["ratio_224"] >= DESCRIPTOR_SPEED_GOAL,
        ),
        Row(
            f"copy descriptor at the demo's 112 px vs features at 224 px ({scope})",
            f"{found['descriptor_112']:.1f} img/s",
            f"{found['features_224']:.1f} img/s",
            f"{found['ratio_demo']:.2f}x",
            "(figure only)",
            True,
        ),
    ]


BENCHMARKS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "ingest": ingest_rows,
    "phash": phash_rows,
    "kmeans": kmeans_rows,
    "ivf": ivf_rows,
    "train_step": train_step_rows,
    "data_pipeline": data_pipeline_rows,
    "bounded_memory": bounded_memory_rows,
    "copy_descriptor": copy_descriptor_rows,
    "multi_student": multi_student_rows,
    "scale": scale_rows,
}


def run_benchmarks(settings: dict[str, dict[str, Any]], names: list[str]) -> list[Row]:
    rows = []
    for name in names:
        started = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            rows += BENCHMARKS[name](settings[name])
        except Exception:  # noqa: BLE001  why: one broken benchmark must not hide the others' figures
            traceback.print_exc()
            rows.append(Row(name, "error", "-", "-", "-", None))
        print(f"[bench] {name} done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return rows


def format_table(rows: list[Row]) -> str:
    header = ("benchmark", "lvd", "baseline", "ratio", "goal", "met?")
    cells = [
        (
            row.benchmark,
            row.lvd,
            row.baseline,
            row.ratio,
            row.goal,
            {True: "yes", False: "NO", None: "error"}[row.met],
        )
        for row in rows
    ]
    widths = [max(len(line[column]) for line in [header, *cells]) for column in range(len(header))]
    lines = [
        "  ".join(value.ljust(width) for value, width in zip(line, widths, strict=True))
        for line in [header, *cells]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="the documented sizes (long), not the quick ones")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = run_benchmarks(FULL if args.full else QUICK, args.only or list(BENCHMARKS))
    print(format_table(rows))
    print(f"{'full' if args.full else 'quick'} sizes, {time.perf_counter() - started:.0f} s in all")
    if any(row.met is None for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
