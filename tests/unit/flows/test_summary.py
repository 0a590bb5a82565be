"""The terminal summary's accuracy table: one row per model, k-NN per k, the linear probe, in percent."""

from __future__ import annotations

from rich.console import Console

from flows.summary import accuracy_table
from pipelines.manifest import EVAL_RESULTS


def test_accuracy_table_lists_each_model_with_its_knn_and_linear_top1():
    rows = [
        {
            "model": "teacher",
            "dataset": "fashion_mnist",
            "protocol": "knn",
            "setting": "k=10",
            "top1": 0.5512,
        },
        {
            "model": "teacher",
            "dataset": "fashion_mnist",
            "protocol": "knn",
            "setting": "k=20",
            "top1": 0.5601,
        },
        {
            "model": "teacher",
            "dataset": "fashion_mnist",
            "protocol": "linear",
            "setting": "cls lr=0.1",
            "top1": 0.7,
        },
        {"model": "student", "dataset": "fashion_mnist", "protocol": "knn", "setting": "k=10", "top1": 0.4},
        {"model": "student", "dataset": "fashion_mnist", "protocol": "knn", "setting": "k=20", "top1": 0.41},
    ]
    table = EVAL_RESULTS.table_from_rows([{**row, "parameters": 1000} for row in rows])
    console = Console(record=True, width=200)
    console.print(accuracy_table(table))
    text = console.export_text()
    lines = text.splitlines()
    teacher = next(line for line in lines if "teacher" in line)
    student = next(line for line in lines if "student" in line)
    assert [cell for cell in teacher.split() if "." in cell] == ["55.1", "56.0", "70.0"]
    assert [cell for cell in student.split() if "." in cell] == ["40.0", "41.0"]
    assert "k-NN k=10" in text
