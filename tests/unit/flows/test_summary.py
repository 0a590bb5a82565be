"""The terminal summary renders whatever tables a stage declares: here evaluate's accuracy table."""

from __future__ import annotations

import pyarrow.parquet as pq
from rich.console import Console

from flows.summary import print_runs, stage_markdown
from pipelines.stage import Manifest, StageRun
from training.eval.results import EVAL_RESULTS


def _evaluate_run(tmp_path) -> StageRun:
    rows = [
        {"model": "teacher", "protocol": "knn", "setting": "k=10", "top1": 0.5512},
        {"model": "teacher", "protocol": "knn", "setting": "k=20", "top1": 0.5601},
        {"model": "teacher", "protocol": "linear", "setting": "cls lr=0.1", "top1": 0.7},
        {"model": "student", "protocol": "knn", "setting": "k=10", "top1": 0.4},
        {"model": "student", "protocol": "knn", "setting": "k=20", "top1": 0.41},
    ]
    table = EVAL_RESULTS.table_from_rows(
        [{**row, "dataset": "fashion_mnist", "parameters": 1000} for row in rows]
    )
    (tmp_path / "results").mkdir()
    pq.write_table(table, tmp_path / "results" / "part-all.parquet")
    manifest = Manifest(str(tmp_path / "results"), EVAL_RESULTS.name, "digest", table.num_rows)
    record = {"timings": {"seconds": 1.0}, "stats": {}, "artifacts": []}
    return StageRun("evaluate", "key", str(tmp_path), {"results": manifest}, record, False)


def test_the_run_summary_prints_each_model_with_its_knn_and_linear_top1(tmp_path):
    console = Console(record=True, width=200)
    print_runs({"evaluate": _evaluate_run(tmp_path)}, console)
    text = console.export_text()
    cells = {
        line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:-1]]
        for line in text.splitlines()
        if line.startswith("│ teacher") or line.startswith("│ student")
    }
    assert cells == {
        "teacher": ["1,000", "55.1", "56.0", "70.0", "cls lr=0.1"],
        "student": ["1,000", "40.0", "41.0", "", ""],
    }
    # Headers wrap at their words to the width of the numbers below them.
    assert "┃ k-NN ┃" in text and "┃ k=10 ┃" in text and "top-1 accuracy (%) on fashion_mnist" in text


def test_a_stage_artifact_in_markdown_carries_its_tables(tmp_path):
    markdown = stage_markdown(_evaluate_run(tmp_path))
    assert "## top-1 accuracy (%) on fashion_mnist" in markdown
    assert "| teacher | 1,000 | 55.1 | 56.0 | 70.0 | cls lr=0.1 |" in markdown


def test_the_run_summary_says_what_a_stage_warned_about(tmp_path):
    run = _evaluate_run(tmp_path)
    warned = StageRun(
        "cluster",
        "key",
        str(tmp_path),
        {},
        {**run.record, "stats": {"warnings": ["num_clusters 9 capped"]}},
        False,
    )
    console = Console(record=True, width=200)
    print_runs({"cluster": warned}, console)
    assert "warning: cluster: num_clusters 9 capped" in console.export_text()
