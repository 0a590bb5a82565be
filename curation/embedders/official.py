"""Published weights by name: DINOv2 backbones (with and without registers) and SSCD copy descriptors.

    embedder config {weights: dinov2_vitl14_reg4} --OFFICIAL--> kind and backbone options (config fields)
      --weights_url (mirror: $LVD_WEIGHTS_MIRROR)--> pipelines.downloads.fetch into the config's
      weights_cache --> the file the kind loads (strictly), and whose sha256 keys the stage

Options follow the official hub code (recipe section 9.1): LayerScale weights in every file, SwiGLU for
the giant, and for `_reg4` files 4 registers with antialiased, offset-free position interpolation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

OFFICIAL_HOST = "https://dl.fbaipublicfiles.com"
# Replaces OFFICIAL_HOST in every URL: a company mirror, or a local server in tests.
MIRROR_VARIABLE = "LVD_WEIGHTS_MIRROR"
DINOV2_SIZES = {"s": "vit_small", "b": "vit_base", "l": "vit_large", "g": "vit_giant2"}
DINOV2_PATCH = 14
DINOV2_REGISTERS = 4
SSCD_NAMES = ("sscd_disc_blur", "sscd_disc_advanced", "sscd_disc_mixup", "sscd_disc_large")


@dataclass(frozen=True, slots=True)
class OfficialWeights:
    kind: str
    path: str  # under OFFICIAL_HOST
    options: dict[str, Any] = field(default_factory=dict)  # embedder config fields the file needs


def _dinov2(size: str, registers: bool) -> OfficialWeights:
    model = f"dinov2_vit{size}14"
    options: dict[str, Any] = {"arch": DINOV2_SIZES[size], "patch_size": DINOV2_PATCH}
    if registers:
        options |= {
            "num_register_tokens": DINOV2_REGISTERS,
            "interpolate_offset": 0.0,
            "interpolate_antialias": True,
        }
    suffix = "_reg4" if registers else ""
    return OfficialWeights("vit", f"dinov2/{model}/{model}{suffix}_pretrain.pth", options)


OFFICIAL: dict[str, OfficialWeights] = {
    **{f"dinov2_vit{size}14": _dinov2(size, registers=False) for size in DINOV2_SIZES},
    **{f"dinov2_vit{size}14_reg4": _dinov2(size, registers=True) for size in DINOV2_SIZES},
    **{
        name: OfficialWeights("torchscript", f"sscd-copy-detection/{name}.torchscript.pt")
        for name in SSCD_NAMES
    },
}


def official_weights(name: str) -> OfficialWeights:
    if name not in OFFICIAL:
        raise ValueError(f"unknown weights {name!r}; known: {', '.join(OFFICIAL)}")
    return OFFICIAL[name]


def weights_url(name: str) -> str:
    host = os.environ.get(MIRROR_VARIABLE) or OFFICIAL_HOST
    return f"{host.rstrip('/')}/{official_weights(name).path}"
