"""Curation stages. Importing this package registers them with the spine's stage registry."""

from curation import dedup, ingest

__all__ = ["dedup", "ingest"]
