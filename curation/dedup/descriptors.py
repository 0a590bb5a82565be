"""Copy-detection descriptors: one shard of images through an embedder, and back out of a manifest.

images rows --read bytes, load_rgb, embedder (batched)--> descriptors rows (float16, unit length)
(`graph.locate_descriptors` reads them back where they lie, matched to images rows on (image_id, uri))
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from curation.embedders import EmbedderConfig, build_embedder
from curation.vectors import embedding_array
from pipelines.images import load_row_rgb
from pipelines.manifest import EMBEDDING, IMAGES, ManifestSchema
from pipelines.partitions import Partition
from pipelines.stage import ShardResult

DESCRIPTORS = ManifestSchema(
    name="descriptors",
    version=1,
    fields=(
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("descriptor", EMBEDDING, nullable=False),  # L2-normalised
    ),
)


def descriptors_table(rows: pa.Table, vectors: np.ndarray) -> pa.Table:
    """A DESCRIPTORS table: `rows`' keys beside `vectors` stored as float16."""
    column = embedding_array(vectors)
    return DESCRIPTORS.validate(
        pa.table({"image_id": rows.column("image_id"), "uri": rows.column("uri"), "descriptor": column})
    )


def describe_shard(embedder_cfg: EmbedderConfig, partition: Partition) -> ShardResult:
    """Shard worker: the descriptor of every row of a partition of `images`, in key order."""
    embedder = build_embedder(embedder_cfg)  # cached: a worker process loads the model once
    rows = partition.read(IMAGES.names, IMAGES)
    started = time.perf_counter()
    vectors = embedder.embed_images(load_row_rgb(row) for row in rows.to_pylist())
    seconds = time.perf_counter() - started
    stats = {"descriptors": {"rows": rows.num_rows, "seconds": round(seconds, 3)}}
    return ShardResult(tables={"descriptors": descriptors_table(rows, vectors)}, stats=stats)
