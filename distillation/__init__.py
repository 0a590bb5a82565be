"""Distillation from a frozen teacher into smaller ViTs. Not built yet."""
