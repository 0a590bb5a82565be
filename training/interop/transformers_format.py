"""Hugging Face transformers: `Dinov2Model` (or `Dinov2WithRegistersModel`) directories, both ways.

    hub-layout state dict + build options --config from the arch, keys renamed, qkv and SwiGLU split-->
      Dinov2[WithRegisters]Model (strict load) --save_pretrained--> config.json, model.safetensors
      + BitImageProcessor (the backbone's resize, crop and normalisation) --> preprocessor_config.json
    a transformers directory --from_pretrained--> the same renaming backwards --> hub-layout state dict

The renaming works on the installed library's module names; `save_pretrained` writes the layout every
transformers release reads. Loading is strict on both sides, so a renamed module is an error, not a
silently random layer.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from training.models.layers import MLP_RATIO
from training.models.vit import ARCHS, LAYER_NORM_EPS

CONFIG_FILE = "config.json"
MODEL_TYPES = ("dinov2", "dinov2_with_registers")
# Outside the blocks: hub name -> transformers name.
EMBEDDING_KEYS = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
# Inside block i: hub name -> transformers name (the fused qkv and SwiGLU w12 are split separately).
BLOCK_KEYS = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.proj.weight": "attention.o_proj.weight",
    "attn.proj.bias": "attention.o_proj.bias",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "ls2.gamma": "layer_scale2.lambda1",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "mlp.w3.weight": "mlp.down_proj.weight",
    "mlp.w3.bias": "mlp.down_proj.bias",
}
QKV = ("q_proj", "k_proj", "v_proj")
SWIGLU_IN = ("gate_proj", "up_proj")  # silu(first half) * second half, as the official w12
# Fused in the hub layout, split in transformers: (hub name in a block, transformers names in order).
FUSED = (
    ("attn.qkv", tuple(f"attention.{name}" for name in QKV)),
    ("mlp.w12", tuple(f"mlp.{name}" for name in SWIGLU_IN)),
)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError("the transformers format needs `pip install 'lvd[export]'` (transformers)") from err
    return transformers


def transformers_config(options: Mapping[str, Any]) -> Any:
    """The transformers config of a backbone's `build_vit` options."""
    lib = _transformers()
    spec = ARCHS[options["arch"]]
    common = {
        "hidden_size": spec.embed_dim,
        "num_hidden_layers": spec.depth,
        "num_attention_heads": spec.num_heads,
        "mlp_ratio": MLP_RATIO,
        "image_size": options["img_size"],
        "patch_size": options["patch_size"],
        "layer_norm_eps": LAYER_NORM_EPS,
        "layerscale_value": 1.0,  # the exported weights carry the trained LayerScale
        "use_swiglu_ffn": (options.get("ffn_layer") or spec.ffn_layer) != "mlp",
    }
    registers = options.get("num_register_tokens", 0)
    if registers:
        return lib.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
    return lib.Dinov2Config(**common)


def renamed_keys(depth: int) -> list[tuple[str, str]]:
    """(hub name, transformers name) of every tensor that is only renamed."""
    pairs = list(EMBEDDING_KEYS.items())
    for block in range(depth):
        pairs += [(f"blocks.{block}.{hub}", f"encoder.layer.{block}.{it}") for hub, it in BLOCK_KEYS.items()]
    return pairs


def to_transformers_state(hub: Mapping[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    out = {theirs: hub[ours] for ours, theirs in renamed_keys(depth) if ours in hub}
    for block, part, (fused, split) in itertools.product(range(depth), ("weight", "bias"), FUSED):
        name = f"blocks.{block}.{fused}.{part}"
        if name in hub:
            for piece, tensor in zip(split, hub[name].chunk(len(split)), strict=True):
                out[f"encoder.layer.{block}.{piece}.{part}"] = tensor
    return out


def from_transformers_state(state: Mapping[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The inverse of `to_transformers_state`."""
    hub = {ours: state[theirs] for ours, theirs in renamed_keys(depth) if theirs in state}
    for block, part, (fused, split) in itertools.product(range(depth), ("weight", "bias"), FUSED):
        pieces = [f"encoder.layer.{block}.{piece}.{part}" for piece in split]
        if pieces[0] in state:
            hub[f"blocks.{block}.{fused}.{part}"] = torch.cat([state[piece] for piece in pieces])
    return hub


def write_transformers(
    hub: Mapping[str, torch.Tensor],
    options: Mapping[str, Any],
    out_dir: Path,
    preprocessing: Mapping[str, Any],
) -> list[Path]:
    """A directory `Dinov2Model.from_pretrained` loads; returns the files written.

    `preprocessing`: resize_size (shorter side), crop_size, mean, std, the backbone's evaluation transform.
    """
    lib = _transformers()
    config = transformers_config(options)
    model_class = lib.Dinov2WithRegistersModel if config.model_type == MODEL_TYPES[1] else lib.Dinov2Model
    model = model_class(config)
    model.load_state_dict(to_transformers_state(hub, config.num_hidden_layers), strict=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor = lib.BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": preprocessing["resize_size"]},
        do_center_crop=True,
        crop_size={"height": preprocessing["crop_size"], "width": preprocessing["crop_size"]},
        do_normalize=True,
        image_mean=list(preprocessing["mean"]),
        image_std=list(preprocessing["std"]),
        do_convert_rgb=True,
    )
    processor.save_pretrained(out_dir)
    return sorted(path for path in out_dir.iterdir() if path.is_file())


def is_transformers_dir(path: Path) -> bool:
    config = path / CONFIG_FILE
    return config.is_file() and json.loads(config.read_text()).get("model_type") in MODEL_TYPES


def read_transformers(path: Path) -> dict[str, torch.Tensor]:
    """The hub-layout state dict of a transformers DINOv2 directory (ours or Meta's `facebook/dinov2-*`)."""
    lib = _transformers()
    model = lib.AutoModel.from_pretrained(path)
    return from_transformers_state(model.state_dict(), model.config.num_hidden_layers)
