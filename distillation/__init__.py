"""Distillation of smaller ViTs from a frozen teacher.

Importing this package registers the `distill` stage.
"""

from distillation import stage

__all__ = ["stage"]
