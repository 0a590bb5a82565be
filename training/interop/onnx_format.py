"""ONNX: the backbone's normalised class and patch tokens, traced with a dynamic batch at its native grid.

backbone --torch.onnx.export (torch.export-based)--> backbone.onnx
  input  pixel_values [batch, 3, S, S] (normalised like the evaluation transform)
  output cls_token [batch, D], patch_tokens [batch, (S / patch)^2, D]
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

ONNX_FILE = "backbone.onnx"
INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("cls_token", "patch_tokens")
EXAMPLE_BATCH = 2  # any size > 1, so the exporter cannot specialise the batch to 1


class _Tokens(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone.forward_features(pixel_values)
        return features["x_norm_clstoken"], features["x_norm_patchtokens"]


def write_onnx(backbone: nn.Module, image_size: int, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ONNX_FILE
    example = torch.zeros(EXAMPLE_BATCH, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        _Tokens(backbone).eval(),
        (example,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes=({0: batch},),
        verbose=False,
    )
    # Why no external_data choice: save() moves the weights to a side file only past protobuf's 2 GB.
    program.save(str(path))
    return sorted(out_dir.glob(f"{ONNX_FILE}*"))
