"""Rows of the `exports` manifest: a hub-format backbone file with the options that rebuild it.

backbone.pth + backbone.pth.json (build_vit options) --export_row--> {model, path, sha256, ...}
any backbone + its build options --save_backbone--> backbone.pth + backbone.pth.json
exports row --load_exported_backbone--> build_vit(**options) with the weights, strict, weights_only
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from torch import nn

from pipelines.manifest import ManifestSchema, read_manifest
from pipelines.store import (
    local_file_sha256,
    location_from_manifest,
    location_in_manifest,
    write_text_atomic,
)
from training.checkpoint import EXPORT_INFO_SUFFIX
from training.models.vit import build_vit_from_options

# One row per exported backbone (hub-format .pth): what evaluation and later stages load.
EXPORTS = ManifestSchema(
    name="exports",
    version=1,
    fields=(
        pa.field("model", pa.string(), nullable=False),  # teacher | student | student_random_init
        # Files inside the store: relative to the manifest's own folder (the store may move); others as given.
        pa.field("path", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("arch", pa.string(), nullable=False),
        pa.field("build_options", pa.string(), nullable=False),  # JSON: build_vit keyword arguments
        pa.field("parameters", pa.int64(), nullable=False),
        pa.field("checkpoint", pa.string()),  # the training checkpoint (with heads) it came from, if any
    ),
)


def save_backbone(backbone: nn.Module, options: dict[str, Any], path: str | os.PathLike) -> Path:
    """Writes `backbone`'s weights as a hub-format `.pth` and `options` as its sidecar JSON, atomically.

    `options` are the `build_vit` arguments that rebuild it, `arch` included (`backbone_options` layout);
    the pair is what `export_backbone` writes, so `export_row` and `load_exported_backbone` read it.
    """
    if "arch" not in options:
        raise ValueError(f"backbone options need an 'arch' entry, got {sorted(options)}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu() for name, tensor in backbone.state_dict().items()}
    temp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    torch.save(state, temp)
    os.replace(temp, out)
    write_text_atomic(out.with_name(out.name + EXPORT_INFO_SUFFIX), json.dumps(options, indent=2))
    return out


def export_row(
    model: str,
    path: str | Path,
    *,
    checkpoint: str | Path | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The exports-manifest row of a backbone file.

    `options` default to the sidecar JSON that `export_backbone` / `save_backbone` write; pass them for a
    file without one (a user's official DINOv2 backbone). `checkpoint` names the training checkpoint
    (backbone and heads) the file was exported from.
    """
    path = Path(path)
    if options is None:
        options = json.loads(path.with_name(path.name + EXPORT_INFO_SUFFIX).read_text())
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {
        "model": model,
        "path": str(path),
        "sha256": local_file_sha256(path),
        "arch": options["arch"],
        "build_options": json.dumps(options, sort_keys=True),
        "parameters": sum(tensor.numel() for tensor in state.values()),
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
    }


LOCATED_COLUMNS = ("path", "checkpoint")


def exports_table(rows: list[dict[str, Any]], manifest_dir: str, store_root: str) -> pa.Table:
    """EXPORTS rows as written to the manifest in `manifest_dir`: files under `store_root` are named
    relative to that folder, so the store can be copied or moved and its exports still resolve."""

    def stored(location: str | None) -> str | None:
        return None if location is None else location_in_manifest(location, manifest_dir, store_root)

    return EXPORTS.table_from_rows(
        [{**row, **{column: stored(row[column]) for column in LOCATED_COLUMNS}} for row in rows]
    )


def read_exports(manifest: Any) -> list[dict[str, Any]]:
    """The rows of an exports manifest with every file location absolute, wherever the store is now."""
    return read_exports_at(manifest.uri)


def read_exports_at(uri: str) -> list[dict[str, Any]]:
    """`read_exports` of the exports manifest at `uri`."""

    def located(location: str | None) -> str | None:
        return None if location is None else location_from_manifest(location, uri)

    return [
        {**row, **{column: located(row[column]) for column in LOCATED_COLUMNS}}
        for row in read_manifest(uri, EXPORTS).to_pylist()
    ]


def load_exported_backbone(row: dict[str, Any]) -> nn.Module:
    """The backbone of an exports row, loaded with strict=True (a key mismatch is an error)."""
    backbone = build_vit_from_options(json.loads(row["build_options"]))
    backbone.load_state_dict(torch.load(row["path"], map_location="cpu", weights_only=True), strict=True)
    return backbone.eval()
