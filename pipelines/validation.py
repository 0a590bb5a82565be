"""The one check every config dataclass uses in `__post_init__`; the loader turns its error into a
one-line `ConfigError` that names the key."""

from __future__ import annotations


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
