"""timm: a checkpoint that `timm.create_model("vit_*_patch14_dinov2", pretrained=True, ...)` loads.

    hub-layout state dict --safetensors--> model.safetensors; the create_model call --> timm.json
    a timm DINOv2 checkpoint (reg_token, no mask_token, packed SwiGLU fc1/fc2) --> hub-layout state dict

timm reads the official hub layout itself (its checkpoint filter folds register models' class position
into the class token and renames SwiGLU), so the export is the backbone's own weights; `timm.json` gives
the model name and the keyword arguments that make timm's model this backbone at its native grid.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from training.models.vit import ARCHS

WEIGHTS_FILE = "model.safetensors"
CALL_FILE = "timm.json"
# lvd arch -> the size in timm's DINOv2 model names.
TIMM_SIZES = {"vit_small": "small", "vit_base": "base", "vit_large": "large", "vit_giant2": "giant"}
NEAREST_TIMM_ARCH = "vit_small"  # other archs take its name and override the shape
OFFICIAL_PATCH = 14
TIMM_REGISTERS = 4  # timm registers DINOv2 models with 0 or 4 registers


def timm_model_name(options: Mapping[str, Any]) -> str:
    size = TIMM_SIZES.get(options["arch"], TIMM_SIZES[NEAREST_TIMM_ARCH])
    registers = "_reg4" if options.get("num_register_tokens", 0) else ""
    return f"vit_{size}_patch14{registers}_dinov2"


def timm_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    """What `create_model` needs beyond the name: the native grid (timm's default is 518 px), and the
    shape of a backbone that is not one of the official four."""
    spec = ARCHS[options["arch"]]
    registers = options.get("num_register_tokens", 0)
    if registers not in (0, TIMM_REGISTERS):
        raise ValueError(f"timm's DINOv2 models have 0 or {TIMM_REGISTERS} registers, not {registers}")
    kwargs: dict[str, Any] = {"img_size": options["img_size"], "num_classes": 0}
    if options["arch"] not in TIMM_SIZES or options["patch_size"] != OFFICIAL_PATCH:
        kwargs |= {
            "patch_size": options["patch_size"],
            "embed_dim": spec.embed_dim,
            "depth": spec.depth,
            "num_heads": spec.num_heads,
        }
    if (options.get("ffn_layer") or spec.ffn_layer) != "mlp" and options["arch"] not in TIMM_SIZES:
        raise ValueError("timm names SwiGLU DINOv2 models only at the official giant size")
    return kwargs


def write_timm(hub: Mapping[str, torch.Tensor], options: Mapping[str, Any], out_dir: Path) -> list[Path]:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_FILE
    save_file({name: tensor.contiguous() for name, tensor in hub.items()}, str(weights))
    call = {"model_name": timm_model_name(options), "kwargs": timm_kwargs(options), "file": WEIGHTS_FILE}
    (out_dir / CALL_FILE).write_text(json.dumps(call, indent=2) + "\n")
    return [weights, out_dir / CALL_FILE]


def is_timm_state(state: Mapping[str, torch.Tensor]) -> bool:
    """timm's own DINOv2 layout: no mask token (timm drops it), otherwise the hub's names."""
    return "cls_token" in state and "mask_token" not in state


def from_timm_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm DINOv2 state dict in hub layout; the mask token (training only) is zero, as at init."""
    hub = dict(state)
    dim = hub["cls_token"].shape[-1]
    hub["mask_token"] = torch.zeros(1, dim, dtype=hub["cls_token"].dtype)
    if "reg_token" in hub:
        # timm added the class position to the class token; a zero class position keeps the sum.
        hub["register_tokens"] = hub.pop("reg_token")
        hub["pos_embed"] = torch.cat([torch.zeros_like(hub["pos_embed"][:, :1]), hub["pos_embed"]], dim=1)
    for name in [key for key in hub if key.endswith(("mlp.fc1.weight", "mlp.fc1.bias"))]:
        block = name[: -len("mlp.fc1.weight")] if name.endswith("weight") else name[: -len("mlp.fc1.bias")]
        # A packed SwiGLU's first layer is twice as wide as its second layer's input; an MLP's is not.
        if hub[f"{block}mlp.fc1.weight"].shape[0] == 2 * hub[f"{block}mlp.fc2.weight"].shape[1]:
            part = name.rsplit(".", 1)[1]
            hub[f"{block}mlp.w12.{part}"] = hub.pop(name)
            hub[f"{block}mlp.w3.{part}"] = hub.pop(f"{block}mlp.fc2.{part}")
    return hub


def read_timm_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)
