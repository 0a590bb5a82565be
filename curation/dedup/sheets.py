"""Contact sheets of duplicate groups: the kept image (red frame) first, then what was dropped."""

from __future__ import annotations

import numpy as np

from curation.dedup.components import GroupResolution, largest_groups
from curation.pictures import Tile, contact_sheet
from pipelines.images import read_image_bytes
from pipelines.manifest import IMAGES
from pipelines.part_rows import RowReader

SHEET_GROUPS = 8
SHEET_TILES_PER_GROUP = 8


def _tile(row: dict, kept: bool) -> Tile:
    try:
        data = read_image_bytes(row)
    except OSError:
        data = None
    return Tile(data, f"{'kept ' if kept else ''}{row['source']}", highlight=kept)


def duplicate_groups_sheet(
    images: RowReader, labels: np.ndarray, resolution: GroupResolution, title: str
) -> bytes:
    """The largest groups, one row each, the representative first; only the rows shown are read."""
    sheet_rows = []
    for members in largest_groups(labels, SHEET_GROUPS):
        ordered = sorted(members.tolist(), key=lambda row: (not resolution.keep[row], row))
        shown = ordered[:SHEET_TILES_PER_GROUP]
        rows = images.read_rows(np.asarray(shown, dtype=np.int64), IMAGES.names).to_pylist()
        sheet_rows.append(
            [_tile(row, bool(resolution.keep[index])) for row, index in zip(rows, shown, strict=True)]
        )
    return contact_sheet(sheet_rows, title)
