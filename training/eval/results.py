"""Evaluation results: the `eval_results` manifest rows, and their table and chart.

ModelResult (one backbone's k-NN per k and chosen probe) --result_rows--> EVAL_RESULTS rows
  --accuracy_table--> (header, rows) in percent, as every summary shows them
ModelResults --results_markdown / results_chart_png--> the stage's artifacts
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.manifest import ManifestSchema
from pipelines.stage import StageRun
from pipelines.views import TableView, figure_png, pyplot, table_view
from training.eval.linear import ProbeResult

KNN_PROTOCOL = "knn"
LINEAR_PROTOCOL = "linear"
PERCENT = 100.0
MILLION = 1e6
CHART_WIDTH_PER_MODEL = 2.2
CHART_MIN_WIDTH = 5.0
CHART_HEIGHT = 3.8
CHART_GROUP_WIDTH = 0.8  # share of one model's slot the bars fill
CHART_DPI = 110

# One row per (model, protocol, setting): k-NN per k, the chosen linear probe.
EVAL_RESULTS = ManifestSchema(
    name="eval_results",
    version=1,
    fields=(
        pa.field("model", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("protocol", pa.string(), nullable=False),  # knn | linear
        pa.field("setting", pa.string(), nullable=False),  # "k=20" | "cls_last4+avgpool lr=0.001"
        pa.field("top1", pa.float64(), nullable=False),  # fraction in [0, 1]
        pa.field("parameters", pa.int64(), nullable=False),
    ),
)

# A row's key, and the order every order-sensitive step puts rows in first (sampling, sharding, search
# row ids, training order): it depends on the rows' content only, never on how a stage laid out its parts.


@dataclass(frozen=True, slots=True)
class ModelResult:
    """One exported backbone's accuracies (fractions) and how long each part took."""

    model: str
    parameters: int
    knn_top1: dict[int, float]
    probe: ProbeResult | None
    seconds: dict[str, float]


def probe_setting(probe: ProbeResult) -> str:
    return f"{probe.feature_set} lr={probe.lr:g}"


def result_rows(result: ModelResult, dataset: str) -> list[dict[str, Any]]:
    """EVAL_RESULTS rows of one model: one per k, then the chosen probe."""
    common = {"model": result.model, "dataset": dataset, "parameters": result.parameters}
    rows = [
        {**common, "protocol": KNN_PROTOCOL, "setting": f"k={k}", "top1": top1}
        for k, top1 in result.knn_top1.items()
    ]
    if result.probe is not None:
        rows.append(
            {
                **common,
                "protocol": LINEAR_PROTOCOL,
                "setting": probe_setting(result.probe),
                "top1": result.probe.test_accuracy,
            }
        )
    return rows


def results_markdown(results: Sequence[ModelResult], ks: Sequence[int], title: str) -> str:
    """A markdown table: model, parameters, k-NN top-1 (%) per k, linear top-1 (%) and its setting."""
    header = ["model", "parameters", *(f"k-NN k={k} (%)" for k in ks), "linear (%)", "linear setting"]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        cells = [result.model, f"{result.parameters:,}"]
        cells += [f"{PERCENT * result.knn_top1[k]:.1f}" for k in ks]
        if result.probe is None:
            cells += ["-", "-"]
        else:
            cells += [f"{PERCENT * result.probe.test_accuracy:.1f}", probe_setting(result.probe)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_chart_png(results: Sequence[ModelResult], ks: Sequence[int], title: str) -> bytes:
    """Grouped bars: per model, k-NN top-1 for each k and the linear probe's top-1, in percent."""
    plt = pyplot()

    series = {f"k-NN k={k}": [result.knn_top1[k] for result in results] for k in ks}
    probes = [result.probe for result in results if result.probe is not None]
    if len(probes) == len(results):
        series["linear"] = [probe.test_accuracy for probe in probes]
    width = CHART_GROUP_WIDTH / len(series)
    slots = np.arange(len(results))
    figure, axes = plt.subplots(
        figsize=(max(CHART_MIN_WIDTH, CHART_WIDTH_PER_MODEL * len(results)), CHART_HEIGHT)
    )
    for position, (label, values) in enumerate(series.items()):
        offsets = slots - CHART_GROUP_WIDTH / 2 + (position + 0.5) * width
        bars = axes.bar(offsets, PERCENT * np.asarray(values), width, label=label)
        axes.bar_label(bars, fmt="%.1f", fontsize="x-small")
    axes.set_xticks(
        slots, [f"{result.model}\n{result.parameters / MILLION:.2f} M params" for result in results]
    )
    axes.set(ylabel="top-1 (%)", ylim=(0, PERCENT), title=title)
    axes.legend(fontsize="small")
    return figure_png(figure, CHART_DPI)


def accuracy_view(results: pa.Table, title: str) -> TableView:
    """Top-1 (%) per model of an EVAL_RESULTS table: k-NN for each k, then the chosen linear probe and its
    setting."""
    rows = results.to_pylist()
    settings = list(dict.fromkeys(row["setting"] for row in rows if row["protocol"] == KNN_PROTOCOL))
    # Short headers (the title says "top-1 (%)"): an 80-column terminal then fits the model names whole.
    header = ["model", "params", *(f"k-NN {setting}" for setting in settings), "linear", "probe"]
    cells = []
    for model in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == model]
        knn = {row["setting"]: row["top1"] for row in mine if row["protocol"] == KNN_PROTOCOL}
        probe = next((row for row in mine if row["protocol"] == LINEAR_PROTOCOL), None)
        cells.append(
            [
                model,
                f"{mine[0]['parameters']:,}",
                *(f"{PERCENT * knn[setting]:.1f}" if setting in knn else "" for setting in settings),
                "" if probe is None else f"{PERCENT * probe['top1']:.1f}",
                "" if probe is None else probe["setting"],
            ]
        )
    return table_view(title, header, cells)


def accuracy_tables(run: StageRun) -> list[TableView]:
    """`StageSpec.tables` of the stages whose output `results` is an EVAL_RESULTS manifest."""
    results = run.outputs["results"].read(EVAL_RESULTS)
    datasets = ", ".join(dict.fromkeys(results.column("dataset").to_pylist()))
    return [accuracy_view(results, f"top-1 accuracy (%) on {datasets or 'nothing'}")]
