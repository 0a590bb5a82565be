"""Human-readable summaries of stage runs: a terminal table after `lvd run`, markdown for Prefect."""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa
from rich.console import Console
from rich.table import Table

from pipelines.stage import StageRun

EVALUATE_STAGE = "evaluate"
KNN_PROTOCOL = "knn"
PERCENT = 100
SECONDS_PER_MINUTE = 60


def runs_table(runs: Mapping[str, StageRun]) -> Table:
    table = Table(title="curate-and-train", title_justify="left")
    for column in ("stage", "status", "compute s", "outputs (rows)"):
        table.add_column(column)
    for stage, run in runs.items():
        status = "reused" if run.reused else "computed"
        outputs = ", ".join(f"{name} {manifest.num_rows}" for name, manifest in run.outputs.items())
        table.add_row(stage, status, f"{run.record['timings']['seconds']:.1f}", outputs)
    return table


def accuracy_table(results: pa.Table) -> Table:
    """Top-1 accuracy per evaluated model: k-NN for every k, then the chosen linear probe."""
    rows = results.to_pylist()
    settings = list(dict.fromkeys(row["setting"] for row in rows if row["protocol"] == KNN_PROTOCOL))
    dataset = rows[0]["dataset"] if rows else ""
    table = Table(title=f"evaluation on {dataset} (top-1 %)", title_justify="left")
    for column in ("model", "parameters", *(f"k-NN {setting}" for setting in settings), "linear"):
        table.add_column(column)
    for model in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == model]
        knn = {row["setting"]: row["top1"] for row in mine if row["protocol"] == KNN_PROTOCOL}
        linear = [row["top1"] for row in mine if row["protocol"] != KNN_PROTOCOL]
        cells = [f"{PERCENT * knn[setting]:.1f}" if setting in knn else "" for setting in settings]
        linear_cell = f"{PERCENT * linear[0]:.1f}" if linear else ""
        table.add_row(model, f"{mine[0]['parameters']:,}", *cells, linear_cell)
    return table


def print_runs(runs: Mapping[str, StageRun], console: Console | None = None) -> None:
    """The run table (and the accuracies, once `evaluate` ran), then every manifest's location."""
    console = console or Console()
    console.print(runs_table(runs))
    total = sum(run.record["timings"]["seconds"] for run in runs.values())
    console.print(f"compute time of these runs: {total / SECONDS_PER_MINUTE:.1f} min", highlight=False)
    if EVALUATE_STAGE in runs:
        console.print(accuracy_table(runs[EVALUATE_STAGE].outputs["results"].read()))
    for stage, run in runs.items():
        for name, manifest in run.outputs.items():
            console.print(f"{stage}/{name}: {manifest.uri}", soft_wrap=True, highlight=False)


def stage_markdown(run: StageRun) -> str:
    stats = run.record.get("stats", {})
    lines = [
        f"# {run.name} ({'reused' if run.reused else 'computed'})",
        "",
        f"folder: `{run.uri}`, {run.record['timings']['seconds']:.1f} s",
        "",
        "| output | rows | manifest |",
        "|---|---|---|",
        *(f"| {name} | {m.num_rows} | `{m.uri}` |" for name, m in run.outputs.items()),
    ]
    reasons = stats.get("rejected_by_reason") or {}
    if reasons:
        lines += ["", "| reject reason | rows |", "|---|---|"]
        lines += [f"| {reason} | {count} |" for reason, count in sorted(reasons.items())]
    return "\n".join(lines)
