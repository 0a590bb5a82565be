"""Dedup stages: exact (sha256), perceptual hash, copy detection, and eval decontamination."""

from curation.dedup import copy, decontaminate, exact, phash

__all__ = ["copy", "decontaminate", "exact", "phash"]
