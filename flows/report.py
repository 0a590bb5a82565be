"""`lvd report`: one self-contained HTML page of a curate-and-train run, and its Prefect summary.

    PipelineConfig --committed_runs (the DAG's keys, never computes)--> {stage: StageRun | None}
      --> sections: stages, duplicates and decontamination, retrieval and clusters (composition table),
          training (loss curves), evaluation (accuracies), the DINOv2 picture (PCA of the teacher's patch
          features on curated images), curated vs uncurated (the `ablate_data` results, when committed)
      --> one HTML file: inline CSS, pictures as base64 data URIs, no scripts, no external resources

Every text value on the page goes through html.escape.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pa_dataset
import pyarrow.parquet as pq
from PIL import Image

from flows.dag import ABLATE_DATA, CURATE_AND_TRAIN, stage_inputs
from pipelines.config import PipelineConfig
from pipelines.images import load_row_rgb
from pipelines.stage import ARTIFACTS_DIR, Manifest, StageRun, get_stage, load_committed, stage_key
from pipelines.store import Store
from training.eval.pca_picture import pca_picture_png
from training.eval.stage import KNN_PROTOCOL
from training.exports import load_exported_backbone
from training.stages import TEACHER_MODEL

REPORT_FILE = "report.html"
PAGE_TITLE = "lvd: curate-and-train report"
NOT_RUN = "not run"
PICTURE_SUFFIX = ".png"
REJECT_SCHEMAS = frozenset({"rejected", "rejected_duplicates"})
REASON_COLUMN = "reason"
DUPLICATE_STAGES = ("exact_dedup", "phash_dedup", "copy_dedup", "decontaminate")
TRAINING_STAGES = ("pretrain", "distill")
PCA_IMAGE_COUNT = 6
PCA_CANDIDATE_ROWS = 10_000
PERCENT = 100
# Stage stats worth a line under a stage's pictures: (stats key, label), shown when the stage has them.
DUPLICATE_COUNTS = (
    ("rows_in", "images in"),
    ("groups", "duplicate groups"),
    ("rows_in_groups", "images in groups"),
    ("largest_group", "largest group"),
    ("rejected", "rejected"),
    ("eval_images_matched", "eval images matched"),
    ("contaminated_components", "contaminated components"),
)
CLUSTER_COUNTS = (("clusters", "clusters"), ("rows", "images"), ("empty_clusters", "empty clusters"))
RETRIEVE_COUNTS = (("pool_rows", "pool images"), ("rows", "retrieved rows"))
TRAINING_COUNTS = (
    ("steps", "steps"),
    ("images", "images"),
    ("objective_first", "first objective"),
    ("objective_last", "last objective"),
    ("seconds_per_step", "s / step"),
)
DAG_NODES = {node.stage: node for node in CURATE_AND_TRAIN + ABLATE_DATA}
ABLATION_STAGES = tuple(node.stage for node in ABLATE_DATA)
ABLATION_RESULTS_STAGE = "ablate_data"
ABLATION_BASELINE_STAGE = "pretrain_random"  # its loss curve sits beside the table
ABLATION_TITLE = "Curated vs uncurated pretraining (Table 2 in miniature)"
EVALUATE_STAGE = "evaluate"
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption, .counts { color: #555; font-size: 0.9em; } .not-run { color: #888; font-style: italic; }
nav ol { columns: 2; } code { font-size: 0.9em; }
"""


def committed_runs(cfg: PipelineConfig, store: Store) -> dict[str, StageRun | None]:
    """The committed run of every stage (curate-and-train's, then the data ablation's) for this config;
    None for a stage without one and for every stage that reads from it."""
    runs: dict[str, StageRun | None] = {}
    found: dict[str, StageRun] = {}
    for node in DAG_NODES.values():
        upstream = {stage for stage, _ in node.inputs.values()}
        if not upstream <= set(found):
            runs[node.stage] = None
            continue
        spec = get_stage(node.stage)
        run = load_committed(spec, stage_key(spec, node.config(cfg), stage_inputs(node, found)), store)
        runs[node.stage] = run
        if run is not None:
            found[node.stage] = run
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
    """Rows of the stage's reject manifests per `reason`, read from the manifests themselves."""
    counts: dict[str, int] = {}
    for manifest in run.outputs.values():
        if manifest.schema_name not in REJECT_SCHEMAS or manifest.num_rows == 0:
            continue
        # Why only the column: reject manifests of a large crawl hold many rows of long URIs.
        reasons = pq.read_table(manifest.uri, columns=[REASON_COLUMN]).column(REASON_COLUMN)
        for entry in pc.value_counts(reasons).to_pylist():
            counts[entry["values"]] = counts.get(entry["values"], 0) + entry["counts"]
    return dict(sorted(counts.items()))


def stage_row(stage: str, run: StageRun | None) -> StageRow:
    """Rows in (the stage's own count, else its main input's), rows per output, rejects, seconds."""
    if run is None:
        return StageRow(stage, NOT_RUN, None, {}, {}, None)
    rows_in = run.record.get("stats", {}).get("rows_in")
    main_input = next(iter(DAG_NODES[stage].inputs), None)  # the DAG lists the main input first
    if rows_in is None and main_input is not None:
        rows_in = run.record["inputs"][main_input]["num_rows"]
    outputs = {name: manifest.num_rows for name, manifest in run.outputs.items()}
    return StageRow(
        stage, "committed", rows_in, outputs, rejects_by_reason(run), run.record["timings"]["seconds"]
    )


def _count(value: int | float | None) -> str:
    if value is None:
        return ""
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _joined(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {count:,}" for name, count in counts.items())


def stage_table(rows: Sequence[StageRow]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the stage table, with a total time row."""
    header = ["stage", "status", "rows in", "outputs (rows)", "rejected by reason", "seconds"]
    cells = [
        [
            row.stage,
            row.status,
            _count(row.rows_in),
            _joined(row.outputs),
            _joined(row.rejects),
            "" if row.seconds is None else f"{row.seconds:.1f}",
        ]
        for row in rows
    ]
    total = sum(row.seconds for row in rows if row.seconds is not None)
    return header, [*cells, ["total", "", "", "", "", f"{total:.1f}"]]


def accuracy_cells(results: pa.Table) -> tuple[list[str], list[list[str]]]:
    """Top-1 (%) per model: k-NN for each k, then the chosen linear probe and its setting."""
    rows = results.to_pylist()
    settings = list(dict.fromkeys(row["setting"] for row in rows if row["protocol"] == KNN_PROTOCOL))
    header = ["model", "parameters", *(f"k-NN {setting} (%)" for setting in settings), "linear (%)", "probe"]
    cells = []
    for model in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == model]
        knn = {row["setting"]: row["top1"] for row in mine if row["protocol"] == KNN_PROTOCOL}
        probe = next((row for row in mine if row["protocol"] != KNN_PROTOCOL), None)
        cells.append(
            [
                model,
                f"{mine[0]['parameters']:,}",
                *(f"{PERCENT * knn[setting]:.1f}" if setting in knn else "" for setting in settings),
                "" if probe is None else f"{PERCENT * probe['top1']:.1f}",
                "" if probe is None else probe["setting"],
            ]
        )
    return header, cells


def composition_table(composition: pa.Table) -> tuple[list[str], list[list[str]]]:
    """The paper's Table 15 layout: seed set, retrieval mode, seed images, retrieved, final; a total."""
    header = ["seed set", "retrieval", "images", "retrieved", "final"]
    rows = composition.to_pylist()
    cells = [
        [
            row["seed_source"],
            row["mode"],
            _count(row["seed_images"]),
            _count(row["retrieved"]),
            _count(row["final"]),
        ]
        for row in rows
    ]
    return header, [*cells, ["total", "", "", "", _count(sum(row["final"] for row in rows))]]


# -- HTML pieces ---------------------------------------------------------------------------------------


def _cell(tag: str, text: str) -> str:
    numeric = tag == "td" and text.replace(",", "").replace(".", "", 1).lstrip("-").isdigit()
    attributes = ' class="num"' if numeric else ""
    return f"<{tag}{attributes}>{html.escape(text)}</{tag}>"


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(_cell("th", text) for text in header)
    body = "".join("<tr>" + "".join(_cell("td", str(text)) for text in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_figure(png: bytes, caption: str) -> str:
    source = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    text = html.escape(caption)
    return f'<figure><img src="{source}" alt="{text}"><figcaption>{text}</figcaption></figure>'


def _not_run(what: str) -> str:
    return f'<p class="not-run">{html.escape(what)}: {NOT_RUN}</p>'


def _counts_line(stats: Mapping[str, Any], labels: Sequence[tuple[str, str]]) -> str:
    parts = [
        f"{label} {_count(stats[key])}" for key, label in labels if isinstance(stats.get(key), int | float)
    ]
    return f'<p class="counts">{html.escape(", ".join(parts))}</p>' if parts else ""


def _pictures(run: StageRun, store: Store) -> str:
    figures = []
    for name in run.record.get("artifacts", []):
        if name.endswith(PICTURE_SUFFIX):
            png = store.fs.cat_file(f"{store.stage_dir(run.name, run.key)}/{ARTIFACTS_DIR}/{name}")
            figures.append(html_figure(png, f"{run.name}: {name}"))
    return "".join(figures)


def _stage_block(stage: str, run: StageRun | None, store: Store, labels: Sequence[tuple[str, str]]) -> str:
    if run is None:
        return f"<h3>{html.escape(stage)}</h3>" + _not_run(stage)
    return (
        f"<h3>{html.escape(stage)}</h3>"
        + _counts_line(run.record.get("stats", {}), labels)
        + _pictures(run, store)
    )


# -- sections ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Section:
    anchor: str
    title: str
    body: str


def stage_rows(runs: Mapping[str, StageRun | None]) -> list[StageRow]:
    """A row per stage; the data ablation's stages only once one of them ran (it runs only when asked)."""
    ablation_ran = any(runs.get(stage) is not None for stage in ABLATION_STAGES)
    return [
        stage_row(stage, run) for stage, run in runs.items() if ablation_ran or stage not in ABLATION_STAGES
    ]


def stages_section(runs: Mapping[str, StageRun | None]) -> Section:
    return Section("stages", "Stages", html_table(*stage_table(stage_rows(runs))))


def duplicates_section(runs: Mapping[str, StageRun | None], store: Store) -> Section:
    body = "".join(_stage_block(stage, runs[stage], store, DUPLICATE_COUNTS) for stage in DUPLICATE_STAGES)
    return Section("duplicates", "Duplicate groups and decontamination matches", body)


def retrieval_section(runs: Mapping[str, StageRun | None], store: Store) -> Section:
    body = _stage_block("retrieve", runs["retrieve"], store, RETRIEVE_COUNTS)
    body += _stage_block("cluster", runs["cluster"], store, CLUSTER_COUNTS)
    body += "<h3>composition of the curated set</h3>"
    assemble = runs["assemble"]
    if assemble is None:
        body += _not_run("assemble")
    else:
        body += html_table(*composition_table(assemble.outputs["composition"].read()))
    return Section("retrieval", "Retrieval, clusters and the curated set", body)


def training_section(runs: Mapping[str, StageRun | None], store: Store) -> Section:
    body = "".join(_stage_block(stage, runs[stage], store, TRAINING_COUNTS) for stage in TRAINING_STAGES)
    return Section("training", "Training: loss curves", body)


def evaluation_section(runs: Mapping[str, StageRun | None], store: Store) -> Section:
    run = runs[EVALUATE_STAGE]
    if run is None:
        return Section("evaluation", "Evaluation: k-NN and linear probe", _not_run("evaluate"))
    results = run.outputs["results"].read()
    datasets = ", ".join(dict.fromkeys(results.column("dataset").to_pylist()))
    body = f'<p class="counts">top-1 on {html.escape(datasets)}</p>'
    body += html_table(*accuracy_cells(results)) + _pictures(run, store)
    return Section("evaluation", "Evaluation: k-NN and linear probe", body)


def pca_images(curated: Manifest, count: int) -> list[Image.Image]:
    """`count` curated images spread evenly over the image ids of the manifest's first rows (the same
    ones on every run; a large curated set is never read whole)."""
    first_rows = pa_dataset.dataset(curated.uri, format="parquet").head(PCA_CANDIDATE_ROWS)
    rows = {row["image_id"]: row for row in first_rows.to_pylist()}
    ids = sorted(rows)
    picks = sorted(set(np.linspace(0, len(ids) - 1, min(count, len(ids))).round().astype(int)))
    return [load_row_rgb(rows[ids[index]]) for index in picks]


def picture_section(runs: Mapping[str, StageRun | None]) -> Section:
    title = "The DINOv2 picture: PCA of patch features"
    pretrain, assemble = runs["pretrain"], runs["assemble"]
    if pretrain is None or assemble is None or assemble.outputs["curated"].num_rows == 0:
        return Section("picture", title, _not_run("pretrain"))
    exports = pretrain.outputs["exports"].read().to_pylist()
    export = next((row for row in exports if row["model"] == TEACHER_MODEL), exports[0])
    images = pca_images(assemble.outputs["curated"], PCA_IMAGE_COUNT)
    png = pca_picture_png(load_exported_backbone(export), images)
    caption = (
        f"pretrained {export['model']} ({export['arch']}): the first three PCA components of the patch "
        f"features of {len(images)} curated images as RGB, fitted on all their patches together; patches "
        "whose first component marks background are black"
    )
    return Section("picture", title, html_figure(png, caption))


def ablation_section(runs: Mapping[str, StageRun | None], store: Store) -> Section:
    run = runs[ABLATION_RESULTS_STAGE]
    if run is None:
        return Section("ablation", ABLATION_TITLE, _not_run(ABLATION_RESULTS_STAGE + " (lvd ablate-data)"))
    body = html_table(*accuracy_cells(run.outputs["results"].read())) + _pictures(run, store)
    baseline = runs.get(ABLATION_BASELINE_STAGE)
    if baseline is not None:
        body += _stage_block(ABLATION_BASELINE_STAGE, baseline, store, TRAINING_COUNTS)
    return Section("ablation", ABLATION_TITLE, body)


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


def build_report(cfg: PipelineConfig, out_path: str | os.PathLike) -> Path:
    """Writes the report page of `cfg`'s committed runs to `out_path`; returns its path."""
    store = Store(cfg.store)
    runs = committed_runs(cfg, store)
    sections = [
        stages_section(runs),
        duplicates_section(runs, store),
        retrieval_section(runs, store),
        training_section(runs, store),
        evaluation_section(runs, store),
        picture_section(runs),
        ablation_section(runs, store),
    ]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_page(PAGE_TITLE, f"store: {cfg.store}", sections), "utf-8")
    return out


# -- the Prefect summary ---------------------------------------------------------------------------------


def store_report_path(cfg: PipelineConfig) -> Path | None:
    """Where the flow writes the page: the store's root folder; None for an object store."""
    store = Store(cfg.store)
    return Path(store.root) / REPORT_FILE if store.is_local else None


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


def report_markdown(cfg: PipelineConfig, html_path: Path | None) -> str:
    """The stage table and the accuracies as markdown, and where the HTML page is."""
    runs = committed_runs(cfg, Store(cfg.store))
    lines = [
        "# curate-and-train",
        "",
        *_markdown_table(*stage_table(stage_rows(runs))),
    ]
    for stage, title in ((EVALUATE_STAGE, "top-1 accuracy"), (ABLATION_RESULTS_STAGE, ABLATION_TITLE)):
        if runs[stage] is not None:
            results = runs[stage].outputs["results"].read()
            lines += ["", f"## {title}", "", *_markdown_table(*accuracy_cells(results))]
    where = f"[{html_path}]({html_path.resolve().as_uri()})" if html_path else "not written (object store)"
    return "\n".join([*lines, "", f"HTML report: {where}"])
