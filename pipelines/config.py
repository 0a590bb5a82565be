"""The generic config machinery: typed loading of frozen dataclasses, presets, files, overrides.

    preset (configs/<name>.yaml) -> file (--config x.yaml|json) -> overrides (--set a.b=v, flow params)
      -> plain dict -> build_config(JobConfig, data) -> frozen dataclasses, every value checked once

No stage's settings live here: each stage module defines its own config dataclass, and the job's root
config (which sections a job has) is made by `job_config_type` from the sections a DAG names. The spine's
own parts of a job are `store` and the `runtime` section. Anything wrong raises `ConfigError` with one
line that names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from pipelines.validation import UserInputError, require

PRESETS_PACKAGE = "configs"
PRESET_SUFFIX = ".yaml"
DEFAULT_STORE = "build/store"
# The spine's own keys of every job config; a stage section may not take these names.
STORE_KEY = "store"
RUNTIME_KEY = "runtime"

ExecutorKind = Literal["serial", "ray"]
T = TypeVar("T")


class ConfigError(UserInputError):
    """A user-facing configuration error; its message is one line naming the key."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RuntimeConfig:
    executor: ExecutorKind = "serial"
    num_workers: int = 2
    """Ray: tasks run at once (and CPUs of a local Ray instance)."""
    ray_address: str | None = None
    """Ray cluster to join; unset means $RAY_ADDRESS, or a local instance."""
    show_progress: bool = True
    gpus_per_worker: float = 0.0
    """Ray: GPUs each model-holding worker (actor) reserves, e.g. 1 for one embedder per GPU."""

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, f"num_workers must be >= 1, got {self.num_workers}")
        require(self.gpus_per_worker >= 0, f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")


def job_config_type(name: str, sections: Mapping[str, type], module: str) -> type:
    """A frozen dataclass `name` with `store`, `runtime` and one field per section, each defaulting to
    its type's defaults.

    `module` is where the caller binds the class under `name`, so that pickle (Ray, Prefect) finds it.

    Raises:
        ValueError: a section takes one of the spine's own names, or its type is not a dataclass.
    """
    fields: list[tuple[str, Any, Any]] = [
        (STORE_KEY, str, field(default=DEFAULT_STORE)),
        (RUNTIME_KEY, RuntimeConfig, field(default_factory=RuntimeConfig)),
    ]
    for section, section_type in sections.items():
        if section in (STORE_KEY, RUNTIME_KEY):
            raise ValueError(f"config section {section!r} would hide the job's own {section!r} key")
        if not dataclasses.is_dataclass(section_type):
            raise ValueError(f"config section {section!r}: {section_type!r} is not a dataclass")
        fields.append((section, section_type, field(default_factory=section_type)))
    namespace = {"__post_init__": _check_store}
    cls = dataclasses.make_dataclass(name, fields, frozen=True, kw_only=True, slots=True, namespace=namespace)
    cls.__module__ = module  # Python 3.11's make_dataclass has no `module` argument
    return cls


def _check_store(job: Any) -> None:
    # Why: an empty store would put every stage folder in the current directory.
    require(bool(job.store.strip()), f"store must name a folder or an fsspec URI, got {job.store!r}")


# -- building from plain data ------------------------------------------------------------------------


def build_config(cls: type[T], data: Mapping[str, Any] | None = None, path: str = "") -> T:
    """Validates plain data (from YAML, JSON, CLI or flow parameters) into a `cls` dataclass.

    `path` prefixes the keys in error messages (a section's name when building one section).
    """
    return _build(cls, data or {}, path)


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = _join(path, unknown[0])
        raise ConfigError(f"{key}: unknown key; allowed: {', '.join(fields)}")
    values = {name: _coerce(hints[name], data[name], _join(path, name)) for name in fields if name in data}
    try:
        return cls(**values)
    except ValueError as err:
        raise ConfigError(f"{path or 'config'}: {err}") from None
    except TypeError as err:
        raise ConfigError(f"{path or 'config'}: {err}") from None


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _coerce(inner, value, path)
    if origin is tuple:
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], item, f"{path}.{index}") for index, item in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else _build(hint, value, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{path}: config type {hint!r} is not supported by the loader")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# -- presets, files, overrides -------------------------------------------------------------------------


def preset_names() -> list[str]:
    files = resources.files(PRESETS_PACKAGE).iterdir()
    return sorted(
        item.name.removesuffix(PRESET_SUFFIX) for item in files if item.name.endswith(PRESET_SUFFIX)
    )


def load_preset(name: str) -> dict[str, Any]:
    resource = resources.files(PRESETS_PACKAGE) / f"{name}{PRESET_SUFFIX}"
    if not resource.is_file():
        raise ConfigError(f"preset: unknown preset {name!r}; available: {', '.join(preset_names())}")
    return yaml.safe_load(resource.read_text()) or {}


def load_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file: {path} does not exist")
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(
            f"config file: {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {err}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file: {path} must hold a mapping at the top level")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.0.c=value` -> (['a', 'b', '0', 'c'], value parsed as YAML, so 3 is an int and [..] a list)."""
    key, separator, raw = text.partition("=")
    if not separator or not key:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, for example ingest.max_pixels=1000000")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Applies `key=value` strings or a {dotted key: value} mapping to a copy of `data`."""
    result = json.loads(json.dumps(data))  # deep copy of plain data
    pairs = (
        [(key.split("."), value) for key, value in overrides.items()]
        if isinstance(overrides, Mapping)
        else [parse_override(text) for text in overrides]
    )
    for keys, value in pairs:
        _set_path(result, keys, value)
    return result


def _set_path(data: Any, keys: list[str], value: Any) -> None:
    node = data
    for depth, key in enumerate(keys):
        dotted = ".".join(keys[: depth + 1])
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"{dotted}: no item {key} in a list of {len(node)}")
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise ConfigError(f"{dotted}: cannot set a key inside a {type(node).__name__}")


def resolve_config(
    cls: type[T],
    preset: str | None = "demo",
    config_file: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> T:
    """Preset, then file, then overrides (later layers win), built into `cls`: the single entry point
    for every front end."""
    data: dict[str, Any] = load_preset(preset) if preset else {}
    if config_file:
        data = _deep_merge(data, load_file(config_file))
    data = apply_overrides(data, overrides)
    return build_config(cls, data)


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_as_dict(cfg: Any) -> dict[str, Any]:
    """Plain data of a config dataclass: what `build_config` takes back."""
    return dataclasses.asdict(cfg)
