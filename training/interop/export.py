"""`lvd export`: lvd backbones (rows of an `exports` manifest) in the formats other libraries load.

exports row (hub .pth + build options) --load_exported_backbone (strict)--> backbone
  --transformers--> <out>/<model>/transformers/{config.json, model.safetensors, preprocessor_config.json}
  --timm--> <out>/<model>/timm/{model.safetensors, timm.json}
  --onnx--> <out>/<model>/onnx/backbone.onnx
every file --sha256--> <out>/format_exports.parquet (FORMAT_EXPORTS: one row per file)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from pipelines.images import IMAGENET_MEAN, IMAGENET_STD
from pipelines.manifest import ManifestSchema
from pipelines.store import local_file_sha256, write_bytes_local_atomic
from training.exports import load_exported_backbone
from training.interop.onnx_format import write_onnx
from training.interop.timm_format import write_timm
from training.interop.transformers_format import write_transformers

MANIFEST_FILE = "format_exports.parquet"
# DINOv2's evaluation transform: resize the shorter side to 256/224 of the crop, centre-crop.
RESIZE_PER_CROP = 256 / 224

FORMAT_EXPORTS = ManifestSchema(
    name="format_exports",
    version=1,
    fields=(
        pa.field("model", pa.string(), nullable=False),  # the exports row's model: teacher, student, ...
        pa.field("format", pa.string(), nullable=False),  # transformers | timm | onnx
        pa.field("path", pa.string(), nullable=False),  # relative to the manifest's folder
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("source_sha256", pa.string(), nullable=False),  # the hub .pth it was made from
    ),
)

Writer = Callable[[nn.Module, dict[str, Any], Path], list[Path]]


def _transformers(backbone: nn.Module, options: dict[str, Any], out: Path) -> list[Path]:
    crop = options["img_size"]
    preprocessing = {
        "resize_size": round(crop * RESIZE_PER_CROP),
        "crop_size": crop,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }
    return write_transformers(backbone.state_dict(), options, out, preprocessing)


def _timm(backbone: nn.Module, options: dict[str, Any], out: Path) -> list[Path]:
    return write_timm(backbone.state_dict(), options, out)


def _onnx(backbone: nn.Module, options: dict[str, Any], out: Path) -> list[Path]:
    return write_onnx(backbone, options["img_size"], out)


WRITERS: dict[str, Writer] = {"transformers": _transformers, "timm": _timm, "onnx": _onnx}
FORMATS = tuple(WRITERS)


def check_formats(formats: Sequence[str]) -> None:
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        given = ", ".join(formats) or "none"
        raise ValueError(f"export formats must be among {', '.join(FORMATS)}; got {given}")


def export_formats(rows: Sequence[dict[str, Any]], formats: Sequence[str], out_dir: Path) -> pa.Table:
    """Writes every row's backbone in every format under `out_dir`; returns (and writes) the manifest."""
    check_formats(formats)
    records = []
    for row in rows:
        backbone = load_exported_backbone(row)
        options = json.loads(row["build_options"])
        for name in formats:
            with torch.no_grad():
                files = WRITERS[name](backbone, options, out_dir / row["model"] / name)
            records += [
                {
                    "model": row["model"],
                    "format": name,
                    "path": str(path.relative_to(out_dir)),
                    "sha256": local_file_sha256(path),
                    "bytes": path.stat().st_size,
                    "source_sha256": row["sha256"],
                }
                for path in files
            ]
    table = FORMAT_EXPORTS.table_from_rows(records)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes_local_atomic(out_dir / MANIFEST_FILE, sink.getvalue().to_pybytes())
    return table
