"""Synthetic embeddings manifests for the cluster, retrieve and assemble tests (no model needed)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.embed import EMBEDDINGS
from curation.vectors import embedding_array
from pipelines.manifest import ManifestSchema
from pipelines.stage import Manifest

DIM = 16
NOISE = 0.08


def planted(num_clusters: int, per_cluster: int, seed: int, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around `num_clusters` random unit centres, and each vector's planted cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(num_clusters), per_cluster)
    vectors = centres[labels] + NOISE * rng.normal(size=(len(labels), dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32), labels


def embeddings_table(vectors: np.ndarray, source: str, role: str, prefix: str) -> pa.Table:
    ids = [f"{prefix}{row:05d}" for row in range(len(vectors))]
    return EMBEDDINGS.validate(
        pa.table(
            {
                "image_id": ids,
                "source": [source] * len(ids),
                "role": [role] * len(ids),
                "uri": [f"/nowhere/{source}/{name}.png" for name in ids],
                "embedding": embedding_array(vectors),
            }
        )
    )


def write_manifest(root: Path, name: str, schema: ManifestSchema, table: pa.Table) -> Manifest:
    """A one-part manifest folder outside any stage, with a digest of its content."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(schema.validate(table), folder / "part-all.parquet")
    digest = hashlib.sha256(repr(table.to_pydict()).encode()).hexdigest()
    return Manifest(uri=str(folder), schema_name=schema.name, digest=digest, num_rows=table.num_rows)
