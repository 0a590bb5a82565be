"""What a stage shows besides its manifests: counts, tables and pictures, in shapes any front end renders.

A stage declares them in its spec (`StageSpec.shown_stats`, `tables`, `figures`); the terminal summary,
the HTML report and the Prefect artifacts render them without knowing which stage they came from.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class TableView:
    """A small table of text cells, e.g. the accuracies of every model or a composition table."""

    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True, slots=True)
class FigureView:
    """A PNG picture computed from a committed run (pictures a stage wrote itself are artifacts)."""

    caption: str
    png: bytes


def format_count(value: int | float | None) -> str:
    """An integer with thousands separators, a float to 4 significant digits, nothing for None."""
    if value is None:
        return ""
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def shown_counts(stats: Mapping[str, Any], labels: Mapping[str, str]) -> list[tuple[str, str]]:
    """(label, formatted value) of each `labels` key that `stats` holds as a number, in `labels` order."""
    return [
        (label, format_count(stats[key]))
        for key, label in labels.items()
        if isinstance(stats.get(key), int | float) and not isinstance(stats.get(key), bool)
    ]


def table_view(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> TableView:
    """A TableView with every cell as text."""
    return TableView(title, tuple(header), tuple(tuple(str(cell) for cell in row) for row in rows))


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display on servers and CI), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(figure: Any, dpi: int) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(figure)
    return buffer.getvalue()
