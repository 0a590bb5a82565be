"""`lvd report`: one self-contained HTML page of a curate-and-train run, and its Prefect summary.

    job config --dag.committed_runs (the DAG's keys, never computes)--> {stage: StageRun | None}
      --> the stage table (rows in, outputs, rejects by reason, seconds), then one section per stage in
          DAG order: its declared counts, its tables, its computed figures, the pictures it stored
      --> one HTML file: inline CSS, pictures as base64 data URIs, no scripts, no external resources

Nothing here knows a stage: what a stage shows is declared in its spec (`pipelines.views`). A branch's
stages (the data ablation) appear once one of them ran. Every text value goes through html.escape.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from flows.curate_and_train import CURATE_AND_TRAIN
from flows.dag import committed_runs
from flows.summary import markdown_table, stage_tables, stage_warnings
from pipelines.manifest import REASON_COLUMN
from pipelines.stage import ARTIFACTS_DIR, StageRun, get_stage
from pipelines.store import Store, write_text_atomic
from pipelines.views import TableView, format_count, shown_counts

REPORT_FILE = "report.html"
PAGE_TITLE = "lvd: curate-and-train report"
NOT_RUN = "not run"
COMMITTED = "committed"
PICTURE_SUFFIX = ".png"
STAGES_ANCHOR = "stages"
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption, .counts { color: #555; font-size: 0.9em; } .not-run { color: #888; font-style: italic; }
nav ol { columns: 2; } code { font-size: 0.9em; } .warning { color: #8a5a00; }
"""


def report_runs(cfg: Any, store: Store) -> dict[str, StageRun | None]:
    """The committed run of every stage of curate-and-train and of its branches (None where none);
    a branch's stages only once one of them ran (branches run only when asked)."""
    runs = committed_runs(CURATE_AND_TRAIN, CURATE_AND_TRAIN.all_nodes, cfg, store)
    for members in CURATE_AND_TRAIN.branches.values():
        if all(runs[item.stage] is None for item in members):
            for item in members:
                del runs[item.stage]
    return runs


@dataclass(frozen=True, slots=True)
class StageRow:
    """One line of the stage table."""

    stage: str
    status: str
    rows_in: int | None
    outputs: dict[str, int]
    rejects: dict[str, int]
    seconds: float | None


def rejects_by_reason(run: StageRun) -> dict[str, int]:
    """Rows of the stage's reject manifests (outputs with a `reason` column) per reason, read from the
    manifests themselves."""
    spec = get_stage(run.name)
    counts: dict[str, int] = {}
    for name, manifest in run.outputs.items():
        if REASON_COLUMN not in spec.outputs[name].names or manifest.num_rows == 0:
            continue
        # Why only the column: reject manifests of a large crawl hold many rows of long URIs.
        reasons = pq.read_table(manifest.uri, columns=[REASON_COLUMN]).column(REASON_COLUMN)
        for entry in pc.value_counts(reasons).to_pylist():
            counts[entry["values"]] = counts.get(entry["values"], 0) + entry["counts"]
    return dict(sorted(counts.items()))


def stage_row(stage: str, run: StageRun | None) -> StageRow:
    """Rows in (the stage's own count, else its first input's), rows per output, rejects, seconds."""
    if run is None:
        return StageRow(stage, NOT_RUN, None, {}, {}, None)
    rows_in = run.record.get("stats", {}).get("rows_in")
    main_input = next(iter(get_stage(stage).inputs), None)  # a spec lists its main input first
    if rows_in is None and main_input is not None:
        rows_in = run.record["inputs"][main_input]["num_rows"]
    outputs = {name: manifest.num_rows for name, manifest in run.outputs.items()}
    return StageRow(
        stage, COMMITTED, rows_in, outputs, rejects_by_reason(run), run.record["timings"]["seconds"]
    )


def _joined(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {count:,}" for name, count in counts.items())


def stage_table(rows: Sequence[StageRow]) -> TableView:
    """The stage table, with a total time row."""
    header = ("stage", "status", "rows in", "outputs (rows)", "rejected by reason", "seconds")
    cells = [
        (
            row.stage,
            row.status,
            format_count(row.rows_in),
            _joined(row.outputs),
            _joined(row.rejects),
            "" if row.seconds is None else f"{row.seconds:.1f}",
        )
        for row in rows
    ]
    total = sum(row.seconds for row in rows if row.seconds is not None)
    return TableView("Stages", header, (*cells, ("total", "", "", "", "", f"{total:.1f}")))


# -- HTML pieces ---------------------------------------------------------------------------------------


def _cell(tag: str, text: str) -> str:
    numeric = tag == "td" and text.replace(",", "").replace(".", "", 1).lstrip("-").isdigit()
    attributes = ' class="num"' if numeric else ""
    return f"<{tag}{attributes}>{html.escape(text)}</{tag}>"


def html_table(view: TableView) -> str:
    head = "".join(_cell("th", text) for text in view.header)
    body = "".join("<tr>" + "".join(_cell("td", text) for text in row) + "</tr>" for row in view.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_figure(png: bytes, caption: str) -> str:
    source = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    text = html.escape(caption)
    return f'<figure><img src="{source}" alt="{text}"><figcaption>{text}</figcaption></figure>'


def _counts_line(run: StageRun) -> str:
    counts = shown_counts(run.record.get("stats", {}), get_stage(run.name).shown_stats)
    text = ", ".join(f"{label} {value}" for label, value in counts)
    return f'<p class="counts">{html.escape(text)}</p>' if counts else ""


def _pictures(run: StageRun, store: Store) -> str:
    figures = []
    for name in run.record.get("artifacts", []):
        if name.endswith(PICTURE_SUFFIX):
            png = store.fs.cat_file(f"{store.stage_dir(run.name, run.key)}/{ARTIFACTS_DIR}/{name}")
            figures.append(html_figure(png, f"{run.name}: {name}"))
    return "".join(figures)


def stage_body(run: StageRun, store: Store) -> str:
    """Everything a committed stage shows: counts, tables, computed figures, stored pictures."""
    spec = get_stage(run.name)
    tables = "".join(f"<h3>{html.escape(view.title)}</h3>" + html_table(view) for view in stage_tables(run))
    figures = spec.figures(run) if spec.figures is not None else []
    computed = "".join(html_figure(figure.png, figure.caption) for figure in figures)
    warnings = "".join(f'<p class="warning">warning: {html.escape(text)}</p>' for text in stage_warnings(run))
    return warnings + _counts_line(run) + tables + computed + _pictures(run, store)


# -- the page ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Section:
    anchor: str
    title: str
    body: str


def stage_section(stage: str, run: StageRun | None, store: Store) -> Section:
    description = html.escape(get_stage(stage).description)
    body = f'<p class="not-run">{NOT_RUN}</p>' if run is None else stage_body(run, store)
    return Section(stage, stage, f'<p class="counts">{description}</p>{body}')


def render_page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    contents = "".join(f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>' for s in sections)
    body = "".join(
        f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>{s.body}</section>' for s in sections
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f'<p class="counts">{html.escape(subtitle)}</p><nav><h2>Contents</h2><ol>{contents}</ol></nav>'
        f"{body}</body></html>\n"
    )


def build_report(cfg: Any, out_path: str | os.PathLike) -> Path:
    """Writes the report page of `cfg`'s committed runs to `out_path` (atomically); returns its path."""
    store = Store(cfg.store)
    runs = report_runs(cfg, store)
    table = stage_table([stage_row(stage, run) for stage, run in runs.items()])
    sections = [Section(STAGES_ANCHOR, table.title, html_table(table))]
    sections += [stage_section(stage, run, store) for stage, run in runs.items()]
    out = Path(out_path)
    write_text_atomic(out, render_page(PAGE_TITLE, f"store: {cfg.store}", sections))
    return out


# -- the Prefect summary ---------------------------------------------------------------------------------


def store_report_path(cfg: Any) -> Path | None:
    """Where the flow writes the page: the store's root folder; None for an object store."""
    store = Store(cfg.store)
    return Path(store.root) / REPORT_FILE if store.is_local else None


def report_markdown(cfg: Any, html_path: Path | None) -> str:
    """The stage table and every stage's tables as markdown, and where the HTML page is."""
    runs = report_runs(cfg, Store(cfg.store))
    table = stage_table([stage_row(stage, run) for stage, run in runs.items()])
    lines = ["# curate-and-train", "", *markdown_table(table.header, table.rows)]
    for run in runs.values():
        if run is not None:
            for view in stage_tables(run):
                lines += ["", f"## {run.name}: {view.title}", "", *markdown_table(view.header, view.rows)]
    where = f"[{html_path}]({html_path.resolve().as_uri()})" if html_path else "not written (object store)"
    return "\n".join([*lines, "", f"HTML report: {where}"])
