"""What the `balance` stage shows: cluster sizes before and after balancing (a plot per level), a row of
taken images per top-level cluster, and the per-level table of its summary and report.

    sizes / taken per cluster of each level --sizes_plot--> balance_sizes.png
    taken rows + their top-level cluster --clusters_sheet--> balance_clusters.png
    the `tree` manifest --composition_view--> per level: clusters, rows per cluster, evenness
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.cluster import uri_tile
from curation.pictures import Tile, contact_sheet
from pipelines.views import TableView, figure_png, pyplot, table_view

SHEET_CLUSTERS = 12
SHEET_IMAGES_PER_CLUSTER = 10
PLOT_DPI = 110
PLOT_PANEL_INCHES = 3.6


def sizes_plot(sizes: Sequence[np.ndarray], selected: Sequence[np.ndarray]) -> bytes:
    """A panel per level: its clusters' pool sizes, largest first, and the rows the sample took from each."""
    plt = pyplot()
    figure, axes = plt.subplots(
        1, len(sizes), figsize=(PLOT_PANEL_INCHES * len(sizes), PLOT_PANEL_INCHES), squeeze=False
    )
    for level, (axis, before, after) in enumerate(zip(axes[0], sizes, selected, strict=True)):
        order = np.argsort(-before, kind="stable")
        axis.plot(before[order], label="pool", drawstyle="steps-mid")
        axis.plot(after[order], label="balanced sample", drawstyle="steps-mid")
        axis.set_yscale("symlog", linthresh=1)
        axis.set_title(f"level {level + 1}: {len(before):,} clusters")
        axis.set_xlabel("cluster, largest first")
    axes[0][0].set_ylabel("images")
    axes[0][0].legend()
    return figure_png(figure, PLOT_DPI)


def clusters_sheet(
    picked: pa.Table, top_cluster: np.ndarray, sizes: np.ndarray, selected: np.ndarray
) -> bytes:
    """A row per top-level cluster (largest first): picked images from it."""
    largest = [int(c) for c in np.argsort(-sizes, kind="stable")[:SHEET_CLUSTERS] if selected[c] > 0]
    uris = picked.column("uri").to_pylist()
    rows = []
    for cluster in largest:
        members = np.flatnonzero(top_cluster == cluster)[:SHEET_IMAGES_PER_CLUSTER]
        caption = f"c{cluster} {sizes[cluster]:,} -> {selected[cluster]:,}"
        rows.append([uri_tile(uris[member], caption if i == 0 else "") for i, member in enumerate(members)])
    return contact_sheet(
        [row or [Tile(None, "")] for row in rows], "balanced sample per top-level cluster (pool -> taken)"
    )


def evenness(counts: np.ndarray) -> float:
    """Entropy of the shares over log(len(counts)): 1 for an even split, towards 0 when one dominates."""
    shares = counts[counts > 0] / max(int(counts.sum()), 1)
    return float(-(shares * np.log(shares)).sum() / np.log(len(counts))) if len(counts) > 1 else 1.0


def composition_view(tree: pa.Table) -> TableView:
    """Per level: clusters, and the smallest / median / largest cluster in the pool and in the sample,
    with the evenness of each (1 = every cluster the same size)."""
    rows = []
    for level in range(pc.max(tree.column("level")).as_py() + 1):
        members = tree.filter(pc.equal(tree.column("level"), level))
        sizes, taken = np.asarray(members.column("size")), np.asarray(members.column("selected"))
        spread = [
            f"{int(values.min()):,} / {np.median(values):,.0f} / {int(values.max()):,}"
            for values in (sizes, taken)
        ]
        rows.append(
            [
                level + 1,
                f"{members.num_rows:,}",
                spread[0],
                spread[1],
                f"{evenness(sizes):.3f}",
                f"{evenness(taken):.3f}",
            ]
        )
    header = [
        "level",
        "clusters",
        "pool: min / median / max",
        "sample: min / median / max",
        "pool evenness",
        "sample evenness",
    ]
    return table_view("the tree, level 1 = leaves: rows per cluster before and after balancing", header, rows)
