"""What is wrong with what a user gave: the one check every config dataclass uses in `__post_init__`
(the loader turns its error into a one-line `ConfigError` that names the key), and the error family
front ends report as one line instead of a traceback."""

from __future__ import annotations


class UserInputError(ValueError):
    """Something a user or an API caller named is wrong (a config value, a file, a source, a store); the
    message is one line that names it. `lvd` prints it and exits with status 2."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
