"""Human-readable summaries of stage runs: a terminal table after `lvd run`, markdown for Prefect.

Whatever a stage shows (its declared counts and tables, `pipelines.views`) is rendered here without
knowing which stage it came from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.console import Console
from rich.table import Table

from pipelines.stage import WARNINGS_KEY, StageRun, get_stage
from pipelines.views import TableView, shown_counts

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


def rich_table(view: TableView) -> Table:
    """A terminal table of `view`. On a narrow terminal cells and headers fold onto more lines, never cut.

    Why widths this way: rich sizes a column by its header too, so numbers under long headers took room
    that model names then lacked; every column after the first is capped at its longest cell (or header
    word), which leaves the first column (model and stage names) the rest. No minimum width is set:
    rich crops whole columns once minimums exceed the terminal.
    """
    table = Table(title=view.title, title_justify="left")
    for index, column in enumerate(view.header):
        sizes = [*map(len, column.split()), *(len(row[index]) for row in view.rows)]
        widest = max(sizes, default=None) if index else None
        table.add_column(column, overflow="fold", max_width=widest)
    for row in view.rows:
        table.add_row(*row)
    return table


def stage_tables(run: StageRun) -> list[TableView]:
    """The tables the run's stage makes of it (none for a stage that declares no `tables`)."""
    spec = get_stage(run.name)
    return list(spec.tables(run)) if spec.tables is not None else []


def stage_warnings(run: StageRun) -> list[str]:
    """What the stage warned about when it ran (`StageContext.warn`)."""
    return list(run.record.get("stats", {}).get(WARNINGS_KEY, []))


def print_runs(runs: Mapping[str, StageRun], console: Console | None = None) -> None:
    """The run table, the stages' warnings, every stage's tables (accuracies, composition), then every
    manifest's location."""
    console = console or Console()
    console.print(runs_table(runs))
    for stage, run in runs.items():
        for warning in stage_warnings(run):
            console.print(f"warning: {stage}: {warning}", style="yellow", soft_wrap=True, highlight=False)
    total = sum(run.record["timings"]["seconds"] for run in runs.values())
    console.print(f"compute time of these runs: {total / SECONDS_PER_MINUTE:.1f} min", highlight=False)
    for run in runs.values():
        for view in stage_tables(run):
            console.print(rich_table(view))
    for stage, run in runs.items():
        for name, manifest in run.outputs.items():
            console.print(f"{stage}/{name}: {manifest.uri}", soft_wrap=True, highlight=False)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


def stage_markdown(run: StageRun) -> str:
    """A stage's Prefect artifact: where it is, its outputs, its declared counts, rejects and tables."""
    stats = run.record.get("stats", {})
    lines = [
        f"# {run.name} ({'reused' if run.reused else 'computed'})",
        "",
        f"folder: `{run.uri}`, {run.record['timings']['seconds']:.1f} s",
        "",
        *markdown_table(
            ["output", "rows", "manifest"],
            [[name, str(m.num_rows), f"`{m.uri}`"] for name, m in run.outputs.items()],
        ),
    ]
    counts = shown_counts(stats, get_stage(run.name).shown_stats)
    if counts:
        lines += ["", *markdown_table(["count", "value"], counts)]
    lines += [f"\n**warning**: {warning}" for warning in stage_warnings(run)]
    reasons = stats.get("rejected_by_reason") or {}
    if reasons:
        lines += ["", *markdown_table(["reject reason", "rows"], sorted(reasons.items()))]
    for view in stage_tables(run):
        lines += ["", f"## {view.title}", "", *markdown_table(view.header, view.rows)]
    return "\n".join(str(line) for line in lines)
