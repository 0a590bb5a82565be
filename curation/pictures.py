"""Contact sheets: rows of image tiles with captions, as one PNG for reports and Prefect artifacts."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont, ImageOps

from pipelines.images import load_rgb

TILE_SIDE = 112
CAPTION_HEIGHT = 14
TITLE_HEIGHT = 22
PADDING = 4
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (20, 20, 20)
HIGHLIGHT = (200, 30, 30)
CAPTION_CHARS = 18


@dataclass(frozen=True, slots=True)
class Tile:
    data: bytes | None  # encoded image bytes; None draws an empty frame (unreadable image)
    caption: str
    highlight: bool = False  # a red frame, e.g. for the image that was kept or the eval match


def _thumbnail(data: bytes | None) -> Image.Image:
    canvas = Image.new("RGB", (TILE_SIDE, TILE_SIDE), BACKGROUND)
    if data is None:
        return canvas
    image = ImageOps.contain(load_rgb(data), (TILE_SIDE, TILE_SIDE))
    canvas.paste(image, ((TILE_SIDE - image.width) // 2, (TILE_SIDE - image.height) // 2))
    return canvas


def contact_sheet(rows: Sequence[Sequence[Tile]], title: str) -> bytes:
    """One PNG: a title line, then each row of tiles left to right with its caption under each tile."""
    columns = max((len(row) for row in rows), default=1)
    cell_width = TILE_SIDE + PADDING
    cell_height = TILE_SIDE + CAPTION_HEIGHT + PADDING
    sheet = Image.new(
        "RGB", (PADDING + columns * cell_width, TITLE_HEIGHT + max(1, len(rows)) * cell_height), BACKGROUND
    )
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((PADDING, PADDING), title, fill=TEXT_COLOUR, font=font)
    for row_index, row in enumerate(rows):
        top = TITLE_HEIGHT + row_index * cell_height
        for column_index, tile in enumerate(row):
            left = PADDING + column_index * cell_width
            sheet.paste(_thumbnail(tile.data), (left, top))
            if tile.highlight:
                draw.rectangle(
                    (left, top, left + TILE_SIDE - 1, top + TILE_SIDE - 1), outline=HIGHLIGHT, width=3
                )
            draw.text((left, top + TILE_SIDE + 1), tile.caption[:CAPTION_CHARS], fill=TEXT_COLOUR, font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
