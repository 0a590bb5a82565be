"""The embedder registry: kind name -> builder, and a per-process cache of loaded models.

    EmbedderConfig(kind=...) --check_config--> the kind exists and accepts the config (when it is built)
                             --build_embedder--> builder of that kind (once per process and config)
                             --weights_fingerprint--> sha256 of the weights file (for stage keys)

A kind registers itself with `register_embedder` when its module is imported. The built-in kinds are
imported on first use (the first config of that kind), so that importing curation does not import torch.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.store import local_file_sha256
from pipelines.validation import require

if TYPE_CHECKING:
    from curation.embedders.base import Embedder
    from curation.embedders.config import EmbedderConfig

# Why: a Ray worker process runs many shards; the few configs of one job stay loaded between them.
CACHED_MODELS = 4

# Kinds that ship with lvd, by module; each module registers its kind when imported.
BUILTIN_KINDS = {
    "torchscript": "curation.embedders.torchscript",
    "efficientnet_lite0": "curation.embedders.efficientnet",
    "vit": "curation.embedders.vit",
}

Builder = Callable[["EmbedderConfig"], "Embedder"]
WeightsFile = Callable[["EmbedderConfig"], str | None]
Validator = Callable[["EmbedderConfig"], None]
WeightsIdentity = tuple[str, int, int, int]  # absolute path, inode, size, ctime in ns


@dataclass(frozen=True, slots=True)
class RegisteredKind:
    """How to build one kind of embedder, which file holds its weights, and its own config checks."""

    build: Builder
    weights_file: WeightsFile
    validate: Validator | None = None


_KINDS: dict[str, RegisteredKind] = {}


def configured_path(cfg: EmbedderConfig) -> str | None:
    """The weights of kinds whose weights come from the config: its `path`, or the published weights it
    names (`weights`), fetched into `weights_cache` on first use."""
    if cfg.weights is None:
        return cfg.path
    from curation.embedders.official import weights_url
    from pipelines.downloads import fetch

    return str(fetch(weights_url(cfg.weights), Path(cfg.weights_cache).expanduser()))


def register_embedder(
    kind: str, build: Builder, weights_file: WeightsFile, validate: Validator | None = None
) -> None:
    """Makes `kind` buildable by `build_embedder`; `weights_file` names the file the weights load from,
    and `validate` (if any) raises ValueError for a config this kind cannot load."""
    if kind in _KINDS:
        raise ValueError(f"embedder kind {kind!r} is already registered")
    _KINDS[kind] = RegisteredKind(build, weights_file, validate)


def embedder_kinds() -> list[str]:
    return sorted(set(_KINDS) | set(BUILTIN_KINDS))


def _kind(cfg: EmbedderConfig) -> RegisteredKind:
    if cfg.kind not in _KINDS and cfg.kind in BUILTIN_KINDS:
        importlib.import_module(BUILTIN_KINDS[cfg.kind])
    if cfg.kind not in _KINDS:
        raise ValueError(f"unknown embedder kind {cfg.kind!r}; registered: {', '.join(embedder_kinds())}")
    return _KINDS[cfg.kind]


def check_config(cfg: EmbedderConfig) -> None:
    """Raises ValueError unless `cfg.kind` is registered and that kind accepts `cfg`."""
    kind = _kind(cfg)
    if kind.weights_file is configured_path:
        require(bool(cfg.path or cfg.weights), f"{cfg.kind} embedders need a weights file (path) or weights")
    if kind.validate is not None:
        kind.validate(cfg)


def build_embedder(cfg: EmbedderConfig) -> Embedder:
    """The embedder for `cfg`, loaded once per process and weights file version."""
    return _build_embedder(cfg, _weights_identity(cfg))


@functools.lru_cache(maxsize=CACHED_MODELS)
def _build_embedder(cfg: EmbedderConfig, weights: WeightsIdentity | None) -> Embedder:
    # Why `weights` keys the cache beside the (frozen) config: a long-lived process (`lvd serve`) must load
    # a weights file replaced at the same path again, not keep the model it loaded first.
    del weights
    return _kind(cfg).build(cfg)


def _weights_identity(cfg: EmbedderConfig) -> WeightsIdentity | None:
    """What changes when the kind's weights file is replaced or rewritten: its path, inode, size and
    change time (ctime, which no copy tool can set back, unlike mtime)."""
    path = _kind(cfg).weights_file(cfg)
    if path is None:
        return None
    stat = os.stat(path)
    return os.path.abspath(path), stat.st_ino, stat.st_size, stat.st_ctime_ns


def weights_fingerprint(cfg: EmbedderConfig) -> str:
    """sha256 of the weights file, so that replacing the file at the same path changes stage keys."""
    identity = _weights_identity(cfg)
    return "" if identity is None else _file_sha256(*identity)


def stage_weights_fingerprint(stage_cfg) -> str:
    """`StageSpec.fingerprint` for stages whose config has an `embedder`: the weights' content keys them."""
    return weights_fingerprint(stage_cfg.embedder)


@functools.lru_cache(maxsize=CACHED_MODELS)
def _file_sha256(path: str, inode: int, size: int, ctime_ns: int) -> str:
    """Cached on the file's identity: computing several stage keys reads a large weights file once, and
    a file replaced at the same path is hashed again."""
    del inode, size, ctime_ns  # the cache key only
    return local_file_sha256(path)
