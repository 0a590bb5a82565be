"""Image embedders: a registry of model kinds that map an image to one L2-normalised vector.

`build_embedder(EmbedderConfig(...))` loads one (see README.md); the kind modules, and torch with them,
are imported on first use.
"""

from curation.embedders.config import EmbedderConfig
from curation.embedders.registry import (
    build_embedder,
    embedder_kinds,
    register_embedder,
    stage_weights_fingerprint,
    weights_fingerprint,
)

__all__ = [
    "EmbedderConfig",
    "build_embedder",
    "embedder_kinds",
    "register_embedder",
    "stage_weights_fingerprint",
    "weights_fingerprint",
]
