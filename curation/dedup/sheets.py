"""Contact sheets of duplicate groups: the kept image (red frame) first, then what was dropped."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from curation.dedup.components import GroupResolution, largest_groups
from curation.pictures import Tile, contact_sheet
from pipelines.images import read_image_bytes

SHEET_GROUPS = 8
SHEET_TILES_PER_GROUP = 8


def _tile(row: dict, kept: bool) -> Tile:
    try:
        data = read_image_bytes(row)
    except OSError:
        data = None
    return Tile(data, f"{'kept ' if kept else ''}{row['source']}", highlight=kept)


def duplicate_groups_sheet(
    images: pa.Table, labels: np.ndarray, resolution: GroupResolution, title: str
) -> bytes:
    """The largest groups, one row each, the representative first."""
    rows = images.to_pylist()
    sheet_rows = []
    for members in largest_groups(labels, SHEET_GROUPS):
        ordered = sorted(members.tolist(), key=lambda row: (not resolution.keep[row], row))
        sheet_rows.append(
            [_tile(rows[row], bool(resolution.keep[row])) for row in ordered[:SHEET_TILES_PER_GROUP]]
        )
    return contact_sheet(sheet_rows, title)
