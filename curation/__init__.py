"""Curation stages. Importing this package registers them with the spine's stage registry."""

from curation import ingest

__all__ = ["ingest"]
