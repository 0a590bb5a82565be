"""Dedup stages: exact (sha256), perceptual hash, copy detection, and eval decontamination."""

from curation.dedup import exact

__all__ = ["exact"]
