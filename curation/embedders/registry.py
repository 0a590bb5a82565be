"""The embedder registry: kind name -> builder, and a per-process cache of loaded models.

    EmbedderConfig(kind=...) --build_embedder--> builder of that kind (once per process and config)
                             --weights_fingerprint--> sha256 of the weights file (for stage keys)

A kind registers itself with `register_embedder` when its module is imported. The built-in kinds are
imported on first use, so that importing curation does not import torch.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipelines.config import EmbedderConfig

if TYPE_CHECKING:
    from curation.embedders.base import Embedder

HASH_CHUNK_BYTES = 1 << 20
# Why: a Ray worker process runs many shards; the few configs of one job stay loaded between them.
CACHED_MODELS = 4

# Kinds that ship with lvd, by module; each module registers its kind when imported.
BUILTIN_KINDS = {
    "torchscript": "curation.embedders.torchscript",
    "efficientnet_lite0": "curation.embedders.efficientnet",
    "vit": "curation.embedders.vit",
}

Builder = Callable[[EmbedderConfig], "Embedder"]
WeightsFile = Callable[[EmbedderConfig], str | None]


@dataclass(frozen=True, slots=True)
class RegisteredKind:
    """How to build one kind of embedder, and which file holds its weights."""

    build: Builder
    weights_file: WeightsFile


_KINDS: dict[str, RegisteredKind] = {}


def configured_path(cfg: EmbedderConfig) -> str | None:
    """The weights file of kinds whose weights come from the config's `path`."""
    return cfg.path


def register_embedder(kind: str, build: Builder, weights_file: WeightsFile) -> None:
    """Makes `kind` buildable by `build_embedder`; `weights_file` names the file the weights load from."""
    if kind in _KINDS:
        raise ValueError(f"embedder kind {kind!r} is already registered")
    _KINDS[kind] = RegisteredKind(build, weights_file)


def embedder_kinds() -> list[str]:
    return sorted(set(_KINDS) | set(BUILTIN_KINDS))


def _kind(cfg: EmbedderConfig) -> RegisteredKind:
    if cfg.kind not in _KINDS and cfg.kind in BUILTIN_KINDS:
        importlib.import_module(BUILTIN_KINDS[cfg.kind])
    if cfg.kind not in _KINDS:
        raise KeyError(f"unknown embedder kind {cfg.kind!r}; registered: {', '.join(embedder_kinds())}")
    return _KINDS[cfg.kind]


@functools.lru_cache(maxsize=CACHED_MODELS)
def build_embedder(cfg: EmbedderConfig) -> Embedder:
    """The embedder for `cfg`, loaded once per process (configs are frozen, so they key the cache)."""
    return _kind(cfg).build(cfg)


def weights_fingerprint(cfg: EmbedderConfig) -> str:
    """sha256 of the weights file, so that replacing the file at the same path changes stage keys."""
    path = _kind(cfg).weights_file(cfg)
    if path is None:
        return ""
    stat = os.stat(path)
    return _file_sha256(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=CACHED_MODELS)
def stage_weights_fingerprint(stage_cfg) -> str:
    """`StageSpec.fingerprint` for stages whose config has an `embedder`: the weights' content keys them."""
    return weights_fingerprint(stage_cfg.embedder)


def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Cached on size and mtime: computing several stage keys reads a large weights file once."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
