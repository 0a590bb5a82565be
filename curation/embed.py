"""The `embed` stage: one retrieval embedding per image (the paper's SSL ViT-H/16; the demo's EfficientNet).

images (key ranges: partitions of rows_per_shard, `row_shards`' ids; the driver never holds the rows)
  --> shards --per worker: build_embedder once (Ray: one actor per GPU or CPU worker)
  --per shard: read bytes, load_rgb, embed (autocast bf16/fp16 on CUDA)--> embeddings part (float16, unit)

Every input row gets exactly one row of `embeddings`, keyed by (image_id, uri), with its source and role
for retrieval. Each shard is committed atomically, so a killed run resumes at the missing shards. On CPU
the model always runs in fp32 (`precision` applies to CUDA only: CPU autocast is slow and lossy).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.embedders import EmbedderConfig, build_embedder, stage_weights_fingerprint
from curation.vectors import embedding_array
from pipelines.images import load_row_rgb
from pipelines.manifest import EMBEDDING, IMAGES, ManifestSchema
from pipelines.partitions import Partition, stage_key_ranges
from pipelines.stage import Manifest, ShardResult, StageContext, StageSpec, register_stage
from pipelines.validation import require

# The images columns each embedding row carries: its key, and what retrieval selects rows by.
COPIED_COLUMNS = ("image_id", "source", "role", "uri")
STATS_KEY = "embed"
ROLES_KEY = "roles"  # per-shard role counts, summed over the shards

Precision = Literal["fp32", "bf16", "fp16"]

EMBEDDINGS = ManifestSchema(
    name="embeddings",
    version=1,
    fields=(
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("role", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("embedding", EMBEDDING, nullable=False),  # L2-normalised
    ),
)


@dataclass(frozen=True, kw_only=True, slots=True)
class EmbedConfig:
    """Retrieval embeddings for every image (the paper: an SSL ViT-H/16; the demo: EfficientNet-Lite0)."""

    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    precision: Precision = "fp32"
    """bf16/fp16 autocast on CUDA; CPU runs fp32."""
    rows_per_shard: int = 256

    def __post_init__(self) -> None:
        require(self.rows_per_shard >= 1, f"rows_per_shard must be >= 1, got {self.rows_per_shard}")


def _autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast for CUDA models; fp32 (no autocast) otherwise."""
    if device != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    import torch  # heavy import: only inside workers that embed

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def embeddings_table(rows: pa.Table, vectors: np.ndarray) -> pa.Table:
    """An EMBEDDINGS table: `rows`' keys beside `vectors` stored as fixed_size_list<float16>."""
    columns = {name: rows.column(name) for name in COPIED_COLUMNS}
    return EMBEDDINGS.validate(pa.table({**columns, "embedding": embedding_array(vectors)}))


def embed_shard(precision: str, embedder: Any, partition: Partition) -> ShardResult:
    """Shard worker: the embedding of every row of a partition of `images` (in key order), with
    `embedder` already loaded."""
    rows = partition.read(IMAGES.names, IMAGES)
    started = time.perf_counter()
    with _autocast(embedder.device, precision):
        vectors = embedder.embed_images(load_row_rgb(row) for row in rows.to_pylist())
    seconds = time.perf_counter() - started
    stats = {
        STATS_KEY: {"rows": rows.num_rows, "seconds": round(seconds, 3)},
        ROLES_KEY: dict(Counter(rows.column("role").to_pylist())),
    }
    return ShardResult(tables={"embeddings": embeddings_table(rows, vectors)}, stats=stats)


def run_embed(cfg: EmbedConfig, inputs: Mapping[str, Manifest], ctx: StageContext) -> dict[str, Any]:
    # Partitions of the key-ranged images: the same shards as row_shards of the whole table, never held.
    images = stage_key_ranges(ctx, "images", inputs["images"].uri, IMAGES, cfg.rows_per_shard)
    started = time.perf_counter()
    shard_stats = ctx.map_shards(
        functools.partial(embed_shard, cfg.precision),
        images.shards(cfg.rows_per_shard),
        state=functools.partial(build_embedder, cfg.embedder),
    )
    totals = shard_stats.get(STATS_KEY, {"rows": 0, "seconds": 0.0})
    rate = round(totals["rows"] / totals["seconds"], 2) if totals["seconds"] else 0.0
    parts = ctx.store.list_parts(ctx.store.output_dir(ctx.spec.name, ctx.key, "embeddings"))
    column = pq.read_schema(parts[0], filesystem=ctx.store.fs).field("embedding").type if parts else None
    return {
        "rows": totals["rows"],
        "dim": column.list_size if column is not None and pa.types.is_fixed_size_list(column) else 0,
        "roles": dict(sorted(shard_stats.get(ROLES_KEY, {}).items())),
        "worker_seconds": round(totals["seconds"], 3),
        # Why: per worker-second, so it compares across worker counts and resumed runs alike.
        "images_per_worker_second": rate,
        "run_seconds": round(time.perf_counter() - started, 3),
    }


EMBED = register_stage(
    StageSpec(
        name="embed",
        version=1,
        config_type=EmbedConfig,
        fn=run_embed,
        inputs={"images": IMAGES},
        outputs={"embeddings": EMBEDDINGS},
        description="one L2-normalised float16 embedding per image, batched on per-worker models",
        shown_stats={"rows": "images", "dim": "dimensions", "images_per_worker_second": "images / worker s"},
        fingerprint=stage_weights_fingerprint,  # the weights file content keys it
    )
)
