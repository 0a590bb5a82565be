"""Embedding columns (fixed_size_list<float16>) to float32 matrices and back."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipelines.manifest import embedding_type


def embedding_matrix(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """[n, dim] float32, re-normalised: float16 storage leaves norms a hair off 1."""
    values = table.column(column).combine_chunks()
    dim = values.type.list_size if pa.types.is_fixed_size_list(values.type) else 0
    flat = np.asarray(values.flatten(), dtype=np.float32)
    vectors = flat.reshape(len(values), dim) if len(values) else np.zeros((0, dim), np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float32).tiny)


def embedding_array(vectors: np.ndarray) -> pa.Array:
    """A fixed_size_list<float16>[dim] array of `vectors`' rows."""
    dim = vectors.shape[1]
    values = pa.array(np.ascontiguousarray(vectors, dtype=np.float16).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(values, dim).cast(embedding_type(dim))
