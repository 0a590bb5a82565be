"""One typed, validated configuration for the whole pipeline, built once at the boundary.

    preset (configs/<name>.yaml) -> file (--config x.yaml|json) -> overrides (--set a.b=v, flow params)
      -> plain dict -> build_config() -> PipelineConfig (frozen dataclasses, every value checked)

Anything wrong raises `ConfigError` with one line that names the key and what is allowed. Stage packages
add their sections to `PipelineConfig` as they land; the spine's own sections are `store`, `runtime` and
`ingest`.
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
from typing import Any, Literal

import yaml

from pipelines.images import DEFAULT_BYTES_COLUMN, IMAGE_EXTENSIONS
from pipelines.train_config import DistillConfig, EvaluateConfig, PretrainConfig
from pipelines.validation import require as _require

# Pillow's own decompression-bomb limit: about a quarter of a GiB of 24-bit pixels.
DEFAULT_MAX_PIXELS = 89_478_485
# Images smaller than this on either side carry too little signal for a 14-pixel patch grid.
DEFAULT_MIN_SIDE = 16
PRESETS_PACKAGE = "configs"
PRESET_SUFFIX = ".yaml"

Role = Literal["curated", "uncurated", "eval"]
SourceKind = Literal["folder", "tar", "parquet"]
ExecutorKind = Literal["serial", "ray"]


class ConfigError(ValueError):
    """A user-facing configuration error; its message is one line naming the key."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SourceConfig:
    """One image source. `path` is a folder, a tar file or folder of tars, or a Parquet file or folder."""

    name: str
    role: Role
    kind: SourceKind
    path: str
    bytes_column: str = DEFAULT_BYTES_COLUMN
    """Parquet sources only: the binary column holding encoded image bytes."""
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    """Folder and tar sources: file name endings that count as images (case-insensitive)."""

    def __post_init__(self) -> None:
        _require(
            bool(self.name) and self.name.replace("_", "").replace("-", "").isalnum(),
            f"must be letters, digits, '_' or '-', got {self.name!r}",
        )
        _require(bool(self.path), "path must not be empty")


@dataclass(frozen=True, kw_only=True, slots=True)
class IngestConfig:
    sources: tuple[SourceConfig, ...] = ()
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Decompression-bomb guard: images with more pixels are rejected before decoding."""
    min_side: int = DEFAULT_MIN_SIDE
    """Images whose shorter side is smaller are rejected as too small."""
    files_per_shard: int = 512
    """Folder sources: files per unit of parallel work and resume."""
    row_groups_per_shard: int = 4
    """Parquet sources: row groups per unit of parallel work and resume."""

    def __post_init__(self) -> None:
        _require(self.max_pixels > 0, f"max_pixels must be > 0, got {self.max_pixels}")
        _require(self.min_side >= 1, f"min_side must be >= 1, got {self.min_side}")
        _require(self.files_per_shard >= 1, f"files_per_shard must be >= 1, got {self.files_per_shard}")
        _require(
            self.row_groups_per_shard >= 1,
            f"row_groups_per_shard must be >= 1, got {self.row_groups_per_shard}",
        )
        names = [source.name for source in self.sources]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        _require(not duplicates, f"source names must be unique, repeated: {duplicates}")


@dataclass(frozen=True, kw_only=True, slots=True)
class KeepRuleConfig:
    """Which member of a duplicate group survives.

    Rows of a `protected_roles` role are never dropped by dedup (they are references: seeds, eval
    sets); the other members of their group are. In a group without protected rows one row is kept:
    the first by role (in `role_priority` order), then the larger (or smaller) resolution, then the
    larger file, then the URI and image id as a stable tie-break.
    """

    role_priority: tuple[Role, ...] = ("eval", "curated", "uncurated")
    protected_roles: tuple[Role, ...] = ("eval", "curated")
    prefer_larger: bool = True

    def __post_init__(self) -> None:
        roles = ("curated", "uncurated", "eval")
        _require(sorted(self.role_priority) == sorted(roles), f"role_priority must order all of {roles}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ExactDedupConfig:
    keep: KeepRuleConfig = field(default_factory=KeepRuleConfig)


HashAlgorithm = Literal["phash", "dhash", "whash", "ahash"]
HASH_BITS = 64


@dataclass(frozen=True, kw_only=True, slots=True)
class PhashDedupConfig:
    algorithm: HashAlgorithm = "phash"
    max_distance: int = 2
    """Two images are near-duplicates when their hashes differ in at most this many bits. On the demo,
    2 finds most JPEG, resize and colour-shift copies; 4 adds mostly look-alike Fashion-MNIST products."""
    rows_per_shard: int = 1024
    keep: KeepRuleConfig = field(default_factory=KeepRuleConfig)

    def __post_init__(self) -> None:
        _require(
            0 <= self.max_distance < HASH_BITS,
            f"max_distance must be in [0, {HASH_BITS}), got {self.max_distance}",
        )
        _require(self.rows_per_shard >= 1, f"rows_per_shard must be >= 1, got {self.rows_per_shard}")


EmbedderKind = Literal["torchscript", "efficientnet_lite0", "vit"]
VitFfnLayer = Literal["mlp", "swiglu", "swiglufused"]
VIT_ARCHS = ("vit_test", "vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant2")
ResizeMode = Literal["short_side", "square"]
Device = Literal["cpu", "cuda"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, kw_only=True, slots=True)
class EmbedderConfig:
    """A model that maps an image to one L2-normalised vector, with its preprocessing."""

    kind: EmbedderKind = "efficientnet_lite0"
    path: str | None = None
    """Weights file: required for `torchscript` (e.g. an SSCD .torchscript.pt file) and `vit` (an official
    DINOv2 hub backbone such as dinov2_vitl14_pretrain.pth, an lvd export, or a teacher checkpoint)."""
    resize: ResizeMode = "square"
    """`square`: resize to image_size x image_size (batches well). `short_side`: keep the aspect ratio;
    torchscript resizes the shorter side to image_size, one image per batch (SSCD's paper protocol, 288);
    efficientnet_lite0 and vit resize it to image_size * 256 / 224 and centre-crop image_size."""
    image_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    batch_size: int = 32
    device: Device = "cpu"
    arch: str = "vit_small"
    """`vit` only: the backbone (training.models.vit.ARCHS); must match the weights file."""
    patch_size: int = 14
    """`vit` only. The image grid (img_size) is read from the file's pos_embed."""
    num_register_tokens: int = 0
    """`vit` only: 4 for the hub's `_reg4` files."""
    ffn_layer: VitFfnLayer | None = None
    """`vit` only: unset takes the arch's own (SwiGLU for vit_giant2, MLP otherwise)."""
    interpolate_offset: float = 0.1
    """`vit` only: 0.0 for the hub's `_reg4` files."""
    interpolate_antialias: bool = False
    """`vit` only: True for the hub's `_reg4` files."""

    def __post_init__(self) -> None:
        _require(
            self.kind not in ("torchscript", "vit") or bool(self.path),
            f"{self.kind} embedders need a path to a weights file",
        )
        _require(self.arch in VIT_ARCHS, f"arch must be one of {VIT_ARCHS}, got {self.arch!r}")
        _require(self.patch_size >= 1, f"patch_size must be >= 1, got {self.patch_size}")
        _require(
            self.kind != "vit" or self.image_size % self.patch_size == 0,
            f"vit: image_size must be a multiple of patch_size {self.patch_size}, got {self.image_size}",
        )
        _require(
            self.num_register_tokens >= 0, f"num_register_tokens must be >= 0, got {self.num_register_tokens}"
        )
        _require(self.image_size >= 1, f"image_size must be >= 1, got {self.image_size}")
        _require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _require(len(self.mean) == len(self.std) == 3, "mean and std must have 3 values (RGB)")


# SSCD's documented preprocessing (see the curation reference): square 320 px, ImageNet mean/std.
SSCD_SQUARE_SIZE = 320
# The paper's copy-detection settings: 64 neighbours, edges with cosine > 0.6; eval decontamination > 0.45.
PAPER_COPY_NEIGHBOURS = 64
PAPER_COPY_THRESHOLD = 0.6
PAPER_DECONTAMINATION_THRESHOLD = 0.45
IndexKind = Literal["auto", "flat", "ivf"]


@dataclass(frozen=True, kw_only=True, slots=True)
class CopyDedupConfig:
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    roles: tuple[Role, ...] = ("uncurated",)
    """Rows of these roles form the duplicate graph (the paper dedups the uncurated pool); the others pass
    through, with descriptors for decontaminate. Add curated/eval to dedup across roles (keep rule)."""
    num_neighbours: int = PAPER_COPY_NEIGHBOURS
    threshold: float = PAPER_COPY_THRESHOLD
    """Edges with cosine similarity above this join images into one duplicate component."""
    index: IndexKind = "auto"
    """`auto`: exact search for small sets, IVF above `ivf_min_rows`."""
    ivf_min_rows: int = 200_000
    ivf_nprobe: int = 32
    """IVF cells searched per query (recall against speed); copies sit close, so a few dozen suffice."""
    rows_per_shard: int = 256
    search_shards: int = 1
    """k-NN index shards, each held by one executor worker (Ray: an actor per node or GPU), merged to the
    exact top-k; 1 keeps one index in the stage's process. Same output for any value (flat index)."""
    keep: KeepRuleConfig = field(default_factory=KeepRuleConfig)

    def __post_init__(self) -> None:
        _require(self.num_neighbours >= 1, f"num_neighbours must be >= 1, got {self.num_neighbours}")
        _require(
            -1.0 <= self.threshold <= 1.0, f"threshold must be a cosine in [-1, 1], got {self.threshold}"
        )
        _require(self.ivf_nprobe >= 1, f"ivf_nprobe must be >= 1, got {self.ivf_nprobe}")
        _require(self.rows_per_shard >= 1, f"rows_per_shard must be >= 1, got {self.rows_per_shard}")
        _require(self.search_shards >= 1, f"search_shards must be >= 1, got {self.search_shards}")
        _require(bool(self.roles), "roles must name at least one role")


@dataclass(frozen=True, kw_only=True, slots=True)
class DecontaminateConfig:
    num_neighbours: int = PAPER_COPY_NEIGHBOURS
    threshold: float = PAPER_DECONTAMINATION_THRESHOLD
    """Pool images in a component (cosine > threshold) with an eval image are removed."""
    drop_roles: tuple[Role, ...] = ("uncurated",)
    index: IndexKind = "auto"
    ivf_min_rows: int = 200_000
    ivf_nprobe: int = 32
    search_shards: int = 1
    """k-NN index shards held by executor workers, as copy_dedup.search_shards (same output for any value)."""

    def __post_init__(self) -> None:
        _require(self.num_neighbours >= 1, f"num_neighbours must be >= 1, got {self.num_neighbours}")
        _require(
            -1.0 <= self.threshold <= 1.0, f"threshold must be a cosine in [-1, 1], got {self.threshold}"
        )
        _require(self.ivf_nprobe >= 1, f"ivf_nprobe must be >= 1, got {self.ivf_nprobe}")
        _require(self.search_shards >= 1, f"search_shards must be >= 1, got {self.search_shards}")
        _require(
            "eval" not in self.drop_roles, "drop_roles must not contain eval: eval images are the references"
        )


Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True, kw_only=True, slots=True)
class EmbedConfig:
    """Retrieval embeddings for every image (the paper: an SSL ViT-H/16; the demo: EfficientNet-Lite0)."""

    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    precision: Precision = "fp32"
    """bf16/fp16 autocast on CUDA; CPU runs fp32."""
    rows_per_shard: int = 256

    def __post_init__(self) -> None:
        _require(self.rows_per_shard >= 1, f"rows_per_shard must be >= 1, got {self.rows_per_shard}")


# The paper clusters the pool into 100,000 clusters; a k-means sample of this many points per centroid
# bounds training memory (Faiss's own default cap).
PAPER_NUM_CLUSTERS = 100_000
DEFAULT_POINTS_PER_CENTROID = 256


@dataclass(frozen=True, kw_only=True, slots=True)
class ClusterConfig:
    num_clusters: int = PAPER_NUM_CLUSTERS
    max_points_per_centroid: int = DEFAULT_POINTS_PER_CENTROID
    """k-means trains on at most num_clusters * this many sampled vectors; all vectors are assigned."""
    num_iterations: int = 20
    roles: tuple[Role, ...] = ("uncurated",)
    seed: int = 0
    rows_per_shard: int = 65_536
    """Assignment shard size: memory stays bounded by one shard plus the centroids."""
    use_gpu: bool = True
    """Train on the GPUs Faiss sees, if any (faiss-gpu builds); CPU otherwise."""

    def __post_init__(self) -> None:
        _require(self.num_clusters >= 1, f"num_clusters must be >= 1, got {self.num_clusters}")
        _require(self.max_points_per_centroid >= 1, "max_points_per_centroid must be >= 1")
        _require(self.num_iterations >= 1, f"num_iterations must be >= 1, got {self.num_iterations}")
        _require(self.rows_per_shard >= 1, f"rows_per_shard must be >= 1, got {self.rows_per_shard}")


RetrievalMode = Literal["sample", "cluster"]
# Paper values: N = 4 nearest per query image (32 for ImageNet-1k); clusters with more than 3 query hits
# give 10,000 images each, at most 1M per seed set.
PAPER_NEIGHBOURS_PER_QUERY = 4
PAPER_MIN_QUERY_HITS = 3
PAPER_IMAGES_PER_CLUSTER = 10_000
PAPER_MAX_IMAGES_PER_SOURCE = 1_000_000


@dataclass(frozen=True, kw_only=True, slots=True)
class RetrievalSourceConfig:
    source: str
    """Name of a curated ingest source whose images are the queries."""
    mode: RetrievalMode = "sample"
    num_neighbours: int = PAPER_NEIGHBOURS_PER_QUERY
    """sample mode: pool images retrieved per query image."""
    min_query_hits: int = PAPER_MIN_QUERY_HITS
    """cluster mode: a cluster qualifies with more than this many query images."""
    images_per_cluster: int = PAPER_IMAGES_PER_CLUSTER
    max_images: int = PAPER_MAX_IMAGES_PER_SOURCE

    def __post_init__(self) -> None:
        _require(self.num_neighbours >= 1, f"num_neighbours must be >= 1, got {self.num_neighbours}")
        _require(self.images_per_cluster >= 1, "images_per_cluster must be >= 1")
        _require(self.max_images >= 1, f"max_images must be >= 1, got {self.max_images}")


CollisionPolicy = Literal["keep_once", "multiplicity"]


@dataclass(frozen=True, kw_only=True, slots=True)
class RetrieveConfig:
    sources: tuple[RetrievalSourceConfig, ...] = ()
    collisions: CollisionPolicy = "multiplicity"
    """A pool image retrieved by several queries: once, or once per retrieval (the paper's counts)."""
    index: IndexKind = "auto"
    ivf_min_rows: int = 200_000
    """`auto` searches exactly below this many pool rows and with IVF from here up."""
    ivf_nprobe: int = 32
    """IVF lists probed per query. Why 32 (benchmarks/ivf_search.py, anisotropic overlapping clusters,
    2 CPU threads): recall@4 0.9985 at 7.2x exact speed on 200,000 rows (where `auto` switches to IVF)
    and 0.992 at 7.3x on 1M; 16 gives 0.977 at 1M, too thin a margin as lists grow with the pool."""
    seed: int = 0
    rows_per_shard: int = 65_536
    """Sample mode: queries per search shard, the unit of fan-out and resume."""
    search_shards: int = 1
    """Pool index shards, each held by one executor worker (Ray: an actor per node or GPU), merged to the
    exact top-N; 1 gives every search worker the whole index. Same output for any value (flat index)."""

    def __post_init__(self) -> None:
        names = [source.source for source in self.sources]
        _require(len(names) == len(set(names)), f"retrieval sources must be unique, got {names}")
        _require(self.ivf_nprobe >= 1, f"ivf_nprobe must be >= 1, got {self.ivf_nprobe}")
        _require(self.rows_per_shard >= 1, f"rows_per_shard must be >= 1, got {self.rows_per_shard}")
        _require(self.search_shards >= 1, f"search_shards must be >= 1, got {self.search_shards}")


@dataclass(frozen=True, kw_only=True, slots=True)
class AssembleConfig:
    include_seeds: bool = True
    """Curated seed images go into the curated set as they are (the paper's "as is" rows)."""
    as_is_sources: tuple[str, ...] = ()
    """Curated sources kept as is; empty means every curated source (the paper keeps only some)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class AblateDataConfig:
    """The paper's Table 2 in miniature, run only when asked (`lvd ablate-data`, `lvd run --ablate-data`).

    The same pretraining on a uniform random sample of the uncurated pool as large as the curated set,
    then both teachers evaluated alike (the `evaluate` section).
    """

    seed: int = 0
    """Seeds the random pool sample; the pretraining and evaluation seeds are those of their sections."""


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
        _require(self.num_workers >= 1, f"num_workers must be >= 1, got {self.num_workers}")
        _require(self.gpus_per_worker >= 0, f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")


@dataclass(frozen=True, kw_only=True, slots=True)
class PipelineConfig:
    store: str = "build/store"
    """Artifact store root: a local folder or an fsspec URI (s3://bucket/prefix)."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    phash_dedup: PhashDedupConfig = field(default_factory=PhashDedupConfig)
    copy_dedup: CopyDedupConfig = field(default_factory=CopyDedupConfig)
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    assemble: AssembleConfig = field(default_factory=AssembleConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ablate_data: AblateDataConfig = field(default_factory=AblateDataConfig)


# -- building from plain data ------------------------------------------------------------------------


def build_config(data: Mapping[str, Any] | None = None) -> PipelineConfig:
    """Validates plain data (from YAML, JSON, CLI or flow parameters) into a PipelineConfig."""
    return _build(PipelineConfig, data or {}, "")


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
    preset: str | None = "demo",
    config_file: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> PipelineConfig:
    """Preset, then file, then overrides: later layers win. The single entry point for every front end."""
    data: dict[str, Any] = load_preset(preset) if preset else {}
    if config_file:
        data = _deep_merge(data, load_file(config_file))
    data = apply_overrides(data, overrides)
    return build_config(data)


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_as_dict(cfg: PipelineConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
