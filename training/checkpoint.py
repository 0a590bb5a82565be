"""Resumable training checkpoints (torch.distributed.checkpoint) and the hub-format backbone export.

    <root>/config.json                     the run's config, for the record
    <root>/backbones.json                  build_vit options of each exportable backbone, first = default
    <root>/step_00000120.partial/          being written by every rank (never read)
    <root>/step_00000120/                  committed: DCP shards of {model, optimizer, step}
    <root>/latest                          name of the newest committed step folder (atomic replace)

Each rank writes its own shards, so saving scales with the world size and a checkpoint resumes on any
other world size (DCP reshards on load). The step folder is renamed from `.partial` only after every
rank finished, and `latest` moves after that: a run killed mid-save resumes from the previous
checkpoint. Nothing loaded runs code: every `torch.load` uses weights_only=True, and DCP's pickled
`.metadata` is read through `dcp_metadata.SafeReader`, which admits checkpoint metadata only.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pipelines.store import write_text_atomic
from training.config import StudentConfig
from training.dcp_metadata import SafeReader

CONFIG_FILE = "config.json"
BACKBONES_FILE = "backbones.json"
LATEST_FILE = "latest"
STEP_PREFIX = "step_"
PARTIAL_SUFFIX = ".partial"
STEP_DIGITS = 8
MODEL_KEY = "model"
BACKBONE_SUFFIX = ".backbone."
EXPORT_INFO_SUFFIX = ".json"
SINGLE_PROCESS_LOAD_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:0{STEP_DIGITS}d}"


def write_run_config(root: Path, cfg_dict: dict[str, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(root / CONFIG_FILE, json.dumps(cfg_dict, indent=2, sort_keys=True))


def write_backbone_options(root: Path, options: dict[str, dict[str, Any]]) -> None:
    """Records how to rebuild each exportable backbone (e.g. {"teacher": build_vit options})."""
    root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(root / BACKBONES_FILE, json.dumps(options, indent=2))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest committed step folder, or None for a fresh run."""
    pointer = root / LATEST_FILE
    if not pointer.exists():
        return None
    return root / pointer.read_text().strip()


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix(STEP_PREFIX))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save_checkpoint(
    root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, keep: int
) -> Path:
    """Commits the state after `step` iterations; keeps the newest `keep` checkpoints."""
    final = root / step_dir_name(step)
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    if _is_main():
        shutil.rmtree(partial, ignore_errors=True)
    _barrier()
    state = {
        MODEL_KEY: get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, optimizer),
        "step": torch.tensor(step),
    }
    dcp.save(state, checkpoint_id=str(partial))
    _barrier()
    if _is_main():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        write_text_atomic(root / LATEST_FILE, final.name)
        for stale in sorted(root.glob(f"{STEP_PREFIX}*"))[:-keep]:
            if not stale.name.endswith(PARTIAL_SUFFIX):
                shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Loads a committed checkpoint into the (sharded) model and optimizer; returns its step.

    The model loads strictly. The optimizer may lack state for parameters that never had a gradient
    (AdamW creates state on a parameter's first gradient): those keep their fresh state, which an
    uninterrupted run would not have used either.
    """
    model_state = {MODEL_KEY: get_model_state_dict(model), "step": torch.tensor(0)}
    dcp.load(model_state, checkpoint_id=str(path), storage_reader=SafeReader(str(path)))
    set_model_state_dict(model, model_state[MODEL_KEY])
    optimizer_state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(
        optimizer_state,
        checkpoint_id=str(path),
        storage_reader=SafeReader(str(path)),
        planner=DefaultLoadPlanner(allow_partial_load=True),
    )
    set_optimizer_state_dict(model, optimizer, optimizer_state["optimizer"])
    return int(model_state["step"])


def read_model_tensors(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Full (unsharded) model tensors of a checkpoint whose names start with `prefix`, in one process."""
    metadata = SafeReader(str(path)).read_metadata().state_dict_metadata
    wanted = f"{MODEL_KEY}.{prefix}"
    tensors = {
        name.removeprefix(f"{MODEL_KEY}."): torch.empty(meta.size, dtype=meta.properties.dtype)
        for name, meta in metadata.items()
        if name.startswith(wanted) and isinstance(meta, TensorStorageMetadata)
    }
    if not tensors:
        raise ValueError(f"{path}: no model tensors named {prefix}* in this checkpoint")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS_LOAD_WARNING)  # reading alone is the intent
        dcp.load({MODEL_KEY: tensors}, checkpoint_id=str(path), storage_reader=SafeReader(str(path)))
    return tensors


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """A (1, 1 + g*g, D) table resized bicubically to `grid` x `grid` (the high-resolution phase)."""
    patches = pos_embed[:, 1:]
    old = math.isqrt(patches.shape[1])
    if old == grid:
        return pos_embed
    image = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    resized = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], resized], dim=1)


def resolve_checkpoint(path: Path) -> Path:
    """A step folder as given, or the latest one of a checkpoint root."""
    if (path / LATEST_FILE).exists():
        found = latest_checkpoint(path)
        assert found is not None
        return found
    if path.name.startswith(STEP_PREFIX) and path.is_dir():
        return path
    raise FileNotFoundError(
        f"{path}: neither a checkpoint folder ({STEP_PREFIX}N) nor a root with {LATEST_FILE}"
    )


def export_backbone(
    checkpoint_dir: str | os.PathLike, out_path: str | os.PathLike, module: str | None = None
) -> Path:
    """Writes one backbone of a checkpoint as a hub-format `.pth`, plus its build options as JSON.

    `module` names the model part ("teacher" for pretraining, "student_ema" for distillation); the default
    is the run's main export. The file loads with `strict=True` into `build_vit(**options)`.
    `checkpoint_dir` is a step folder or a checkpoint root.
    """
    step_path = resolve_checkpoint(Path(checkpoint_dir))
    exportable = json.loads((step_path.parent / BACKBONES_FILE).read_text())
    name = module or next(iter(exportable))
    if name not in exportable:
        raise ValueError(f"{checkpoint_dir}: no backbone {name!r}; this run has {', '.join(exportable)}")
    prefix = f"{name}{BACKBONE_SUFFIX}"
    backbone = {
        key.removeprefix(prefix): tensor for key, tensor in read_model_tensors(step_path, prefix).items()
    }
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    torch.save(backbone, temp)
    os.replace(temp, out)
    write_text_atomic(out.with_name(out.name + EXPORT_INFO_SUFFIX), json.dumps(exportable[name], indent=2))
    return out


def backbone_options(student: StudentConfig, img_size: int) -> dict[str, Any]:
    """The `build_vit` arguments that rebuild a backbone (drop path is a training-only option)."""
    return {
        "arch": student.arch,
        "patch_size": student.patch_size,
        "img_size": img_size,
        "num_register_tokens": student.num_register_tokens,
        "ffn_layer": student.ffn_layer,
        "interpolate_offset": student.interpolate_offset,
        "interpolate_antialias": student.interpolate_antialias,
    }


def load_initial_weights(model: nn.Module, source: str | os.PathLike, grid: int) -> None:
    """Starts a run from earlier weights (the high-resolution phase).

    `source` is a checkpoint (root or step folder): student and teacher continue from their own weights,
    heads included; or a hub-format backbone `.pth`: both backbones start from it, heads keep their fresh
    init. Every pos_embed is resized to `grid` when it differs. Optimizer state and centres start afresh.
    """
    path = Path(source)
    if path.is_dir():
        tensors = read_model_tensors(resolve_checkpoint(path))
        full = {name: t for name, t in tensors.items() if name.startswith(("student.", "teacher."))}
    else:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        full = {f"{part}.backbone.{name}": t for part in ("student", "teacher") for name, t in loaded.items()}
    for name in [name for name in full if name.endswith(".backbone.pos_embed")]:
        full[name] = resize_pos_embed(full[name], grid)
    # Why not strict: a hub file has no heads. Names must still all match: a renamed key silently left at
    # random init is the classic evaluation bug (recipe 9.2).
    result = set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
    if result.unexpected_keys:
        raise ValueError(f"{source}: keys the model does not have: {sorted(result.unexpected_keys)[:5]}")
    missing_backbone = [name for name in result.missing_keys if ".backbone." in f".{name}"]
    if missing_backbone:
        raise ValueError(f"{source}: backbone keys missing from the weights: {missing_backbone[:5]}")
