"""Human-readable summaries of stage runs: a terminal table after `lvd run`, markdown for Prefect."""

from __future__ import annotations

from collections.abc import Mapping

from rich.console import Console
from rich.table import Table

from pipelines.stage import StageRun


def runs_table(runs: Mapping[str, StageRun]) -> Table:
    table = Table(title="curate-and-train", title_justify="left")
    for column in ("stage", "status", "compute s", "outputs (rows)"):
        table.add_column(column)
    for stage, run in runs.items():
        status = "reused" if run.reused else "computed"
        outputs = ", ".join(f"{name} {manifest.num_rows}" for name, manifest in run.outputs.items())
        table.add_row(stage, status, f"{run.record['timings']['seconds']:.1f}", outputs)
    return table


def print_runs(runs: Mapping[str, StageRun], console: Console | None = None) -> None:
    """The run table, then every manifest's location on a line of its own (easy to copy)."""
    console = console or Console()
    console.print(runs_table(runs))
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
