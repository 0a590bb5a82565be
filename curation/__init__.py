"""Curation stages. Importing this package registers them with the spine's stage registry."""

from curation import assemble, cluster, copydetect, dedup, embed, ingest, random_pool, retrieve

__all__ = ["assemble", "cluster", "copydetect", "dedup", "embed", "ingest", "random_pool", "retrieve"]
