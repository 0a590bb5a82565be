"""Curation stages. Importing this package registers them with the spine's stage registry."""

# Faiss is an extra (two builds install the same package): say which to install, not "No module faiss".
try:
    import faiss  # noqa: F401
except ImportError as missing:
    raise ImportError(
        "lvd's curation stages need Faiss: pip install 'lvd[cpu]' (faiss-cpu), "
        "or 'lvd[gpu]' (faiss-gpu-cu12) on a CUDA 12 machine"
    ) from missing

from curation import assemble, balance, cluster, copydetect, dedup, embed, ingest, random_pool, retrieve

__all__ = [
    "assemble",
    "balance",
    "cluster",
    "copydetect",
    "dedup",
    "embed",
    "ingest",
    "random_pool",
    "retrieve",
]
