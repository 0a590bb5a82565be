"""Stages: a plain function plus a spec, a registry, and `run_stage`, which caches, resumes and commits.

run_stage(spec, cfg, inputs)
  key = hash(stage, version, canonical config, input digests, source fingerprint)
  <store>/<stage>/<key>/_STAGE.json exists?  -> return it (a rerun is free)
  else spec.fn(cfg, inputs, ctx)             -> ctx.map_shards: one atomic part per shard and output
                                                (finished shards are skipped on resume)
  validate every output against its schema, digest it, write _STAGE.json last
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipelines.executor import Executor, SerialExecutor
from pipelines.manifest import ManifestError, ManifestSchema, read_manifest
from pipelines.store import Store, canonical_json, sha256_text
from pipelines.views import FigureView, TableView

KEY_LENGTH = 16
ARTIFACTS_DIR = "artifacts"
RECORD_FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class Manifest:
    """A committed stage output: where it is, what schema it has, and a digest of its content."""

    uri: str
    schema_name: str
    digest: str
    num_rows: int

    def read(self, schema: ManifestSchema | None = None) -> pa.Table:
        return read_manifest(self.uri, schema)


@dataclass(frozen=True, slots=True)
class Shard:
    """One unit of fan-out work. `shard_id` must derive from the shard's content, never its position."""

    shard_id: str
    payload: Any


@dataclass(frozen=True, slots=True)
class ShardResult:
    """What a shard worker returns: one table per stage output, plus summable stats."""

    tables: Mapping[str, pa.Table]
    stats: Mapping[str, Any] = field(default_factory=dict)


StageFn = Callable[[Any, Mapping[str, Manifest], "StageContext"], Mapping[str, Any] | None]
TablesFn = Callable[["StageRun"], Sequence[TableView]]
FiguresFn = Callable[["StageRun"], Sequence[FigureView]]


@dataclass(frozen=True, kw_only=True, slots=True)
class StageSpec:
    """A stage's contract. Bump `version` whenever the same config and inputs would give other output.

    `inputs` and `outputs` name the manifests the stage reads and writes, each with its schema: a DAG
    wires outputs to inputs by these names and checks the schemas agree. `config_type` is the stage's
    own config dataclass. What the stage shows besides its manifests: `shown_stats` (stats key -> label,
    the counts worth a line in a summary), `tables` (small tables made from a committed run) and
    `figures` (pictures computed from one, e.g. by a model); pictures the stage wrote are artifacts.
    """

    name: str
    version: int
    config_type: type
    fn: StageFn
    inputs: Mapping[str, ManifestSchema]
    outputs: Mapping[str, ManifestSchema]
    description: str
    # Extra key material for data read from outside the store (ingest's file listing).
    fingerprint: Callable[[Any], str] | None = None
    shown_stats: Mapping[str, str] = field(default_factory=dict)
    tables: TablesFn | None = None
    figures: FiguresFn | None = None


_REGISTRY: dict[str, StageSpec] = {}


def register_stage(spec: StageSpec) -> StageSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"stage {spec.name!r} is already registered; stage names must be unique")
    _REGISTRY[spec.name] = spec
    return spec


def get_stage(name: str) -> StageSpec:
    if name not in _REGISTRY:
        raise KeyError(f"unknown stage {name!r}; registered: {', '.join(sorted(_REGISTRY)) or 'none'}")
    return _REGISTRY[name]


def registered_stages() -> dict[str, StageSpec]:
    return dict(_REGISTRY)


@dataclass
class StageContext:
    """What a running stage may use: the executor for fan-out and its own output folder."""

    spec: StageSpec
    key: str
    store: Store
    executor: Executor
    show_progress: bool = True
    stats: dict[str, Any] = field(default_factory=dict)

    def map_shards(
        self,
        worker: Callable[..., ShardResult],
        shards: Sequence[Shard],
        outputs: Sequence[str] | None = None,
        state: Callable[[], Any] | None = None,
    ) -> dict[str, Any]:
        """Runs `worker` on every shard not finished yet and returns the summed stats of all shards.

        `worker` must be picklable (a module-level function or a functools.partial of one) so that it
        can run on Ray workers; it writes nothing itself. It returns a table for each of `outputs`
        (default: all of the stage's outputs); a fan-in step may write the others with `write_output`.
        With `state` (a picklable factory, e.g. one that loads a model), every executor worker calls
        `state()` once and the worker is called as `worker(state_value, payload)` (Ray: actors).
        """
        ids = [shard.shard_id for shard in shards]
        if len(set(ids)) != len(ids):
            raise ValueError(f"stage {self.spec.name}: shard ids are not unique")
        todo = [shard for shard in shards if not self.store.exists(self._shard_record(shard.shard_id))]
        names = list(outputs) if outputs is not None else list(self.spec.outputs)
        schemas = {name: self.spec.outputs[name] for name in names}
        commit = functools.partial(_commit_shard, self.store, self.spec.name, self.key, schemas)
        if state is None:
            results = self.executor.map_unordered(functools.partial(_compute_shard, worker, commit), todo)
        else:
            task = functools.partial(_compute_shard_with_state, worker, commit)
            results = self.executor.map_with_state(state, task, todo)
        with tqdm(
            total=len(shards),
            initial=len(shards) - len(todo),
            desc=self.spec.name,
            unit="shard",
            disable=not self.show_progress,
        ) as progress:
            for _ in results:
                progress.update(1)
        total: dict[str, Any] = {}
        for shard in shards:
            _add_stats(total, self.store.read_json(self._shard_record(shard.shard_id))["stats"])
        return total

    def write_output(self, output: str, table: pa.Table, shard_id: str = "all") -> None:
        """For fan-in stages: writes one whole output part directly."""
        validated = self.spec.outputs[output].validate(table)
        self.store.write_table_atomic(
            self.store.part_path(self.spec.name, self.key, output, shard_id), validated
        )

    def read_output(self, output: str) -> pa.Table:
        """What this run wrote to `output` so far (e.g. after `map_shards`), as one validated table."""
        directory = self.store.output_dir(self.spec.name, self.key, output)
        if not self.store.list_parts(directory):
            return self.spec.outputs[output].empty_table()
        return read_manifest(self.store.uri_of(directory), self.spec.outputs[output])

    def output_uri(self, output: str) -> str:
        """Where this run writes `output`: read its parts where they lie (`curation.vector_parts`)."""
        return self.store.uri_of(self.store.output_dir(self.spec.name, self.key, output))

    def write_artifact(self, name: str, data: bytes) -> str:
        """Stores a file beside the outputs (a picture, a report); returns its location."""
        path = f"{self.store.stage_dir(self.spec.name, self.key)}/{ARTIFACTS_DIR}/{name}"
        self.store.write_bytes_atomic(path, data)
        return self.store.uri_of(path)

    def local_dir(self, name: str) -> Path:
        """A folder inside this run's stage directory that survives a killed run (training checkpoints).

        Raises:
            ValueError: the store is not on the local file system (tools like torch.distributed.checkpoint
            write folders of files, not single objects).
        """
        if not self.store.is_local:
            raise ValueError(f"stage {self.spec.name} needs a local store folder, got {self.store.uri}")
        path = Path(self.store.stage_dir(self.spec.name, self.key)) / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _shard_record(self, shard_id: str) -> str:
        return self.store.shard_record_path(self.spec.name, self.key, shard_id)


def _compute_shard(
    worker: Callable[[Any], ShardResult], commit: Callable[[Shard, ShardResult], str], shard: Shard
) -> str:
    return commit(shard, worker(shard.payload))


def _compute_shard_with_state(
    worker: Callable[[Any, Any], ShardResult],
    commit: Callable[[Shard, ShardResult], str],
    state: Any,
    shard: Shard,
) -> str:
    return commit(shard, worker(state, shard.payload))


def _commit_shard(
    store: Store,
    stage: str,
    key: str,
    outputs: dict[str, ManifestSchema],
    shard: Shard,
    result: ShardResult,
) -> str:
    """Writes one shard's parts atomically, then its record: the record marks the shard finished."""
    if set(result.tables) != set(outputs):
        raise ValueError(
            f"stage {stage}: shard returned outputs {sorted(result.tables)}, expected {sorted(outputs)}"
        )
    for name, schema in outputs.items():
        table = schema.validate(result.tables[name])
        store.write_table_atomic(store.part_path(stage, key, name, shard.shard_id), table)
    # Written after every part: its presence is what marks the shard finished.
    record = {"shard_id": shard.shard_id, "stats": dict(result.stats)}
    store.write_json_atomic(store.shard_record_path(stage, key, shard.shard_id), record)
    return shard.shard_id


def _add_stats(total: dict[str, Any], update: Mapping[str, Any]) -> None:
    """Sums numbers and merges nested dicts, so per-shard counters add up to stage counters."""
    for name, value in update.items():
        if isinstance(value, Mapping):
            _add_stats(total.setdefault(name, {}), value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            total[name] = total.get(name, 0) + value
        else:
            total[name] = value


def config_to_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return cfg


def stage_key(spec: StageSpec, cfg: Any, inputs: Mapping[str, Manifest]) -> str:
    material = {
        "stage": spec.name,
        "version": spec.version,
        "config": config_to_dict(cfg),
        "inputs": {name: manifest.digest for name, manifest in sorted(inputs.items())},
        "fingerprint": spec.fingerprint(cfg) if spec.fingerprint else None,
    }
    return sha256_text(canonical_json(material))[:KEY_LENGTH]


@dataclass(frozen=True, slots=True)
class StageRun:
    """A committed stage: its key, folder, outputs and the record written at commit."""

    name: str
    key: str
    uri: str
    outputs: dict[str, Manifest]
    record: dict[str, Any]
    reused: bool


def run_stage(
    spec: StageSpec,
    cfg: Any,
    inputs: Mapping[str, Manifest],
    *,
    store: Store,
    executor: Executor | None = None,
    show_progress: bool = True,
) -> StageRun:
    """Returns the committed output of `spec` for `cfg` and `inputs`, computing only what is missing."""
    if not isinstance(cfg, spec.config_type):
        raise TypeError(f"stage {spec.name} takes {spec.config_type.__name__}, got {type(cfg).__name__}")
    if set(inputs) != set(spec.inputs):
        raise ValueError(f"stage {spec.name} takes inputs {sorted(spec.inputs)}, got {sorted(inputs)}")
    for name, manifest in inputs.items():
        if manifest.schema_name != spec.inputs[name].name:
            raise ValueError(
                f"stage {spec.name}: input {name} takes a manifest of schema {spec.inputs[name].name}, "
                f"got one of schema {manifest.schema_name}"
            )
    key = stage_key(spec, cfg, inputs)
    committed = load_committed(spec, key, store)
    if committed is not None:
        return committed
    started = time.time()
    store.remove_temp_files(store.stage_dir(spec.name, key))
    ctx = StageContext(spec, key, store, executor or SerialExecutor(), show_progress)
    stats = spec.fn(cfg, inputs, ctx) or {}
    outputs = {name: _seal_output(store, spec, key, name, schema) for name, schema in spec.outputs.items()}
    record = {
        "format_version": RECORD_FORMAT_VERSION,
        "stage": spec.name,
        "version": spec.version,
        "key": key,
        "config": config_to_dict(cfg),
        "inputs": {name: dataclasses.asdict(manifest) for name, manifest in inputs.items()},
        "outputs": {name: dataclasses.asdict(manifest) for name, manifest in outputs.items()},
        "stats": stats,
        "artifacts": _list_artifacts(store, spec.name, key),
        "timings": {"started": started, "seconds": round(time.time() - started, 3)},
        "lvd_version": _lvd_version(),
    }
    store.write_json_atomic(store.record_path(spec.name, key), record)
    return StageRun(
        spec.name, key, store.uri_of(store.stage_dir(spec.name, key)), outputs, record, reused=False
    )


def load_committed(spec: StageSpec, key: str, store: Store) -> StageRun | None:
    """The committed run at `key`, or None if it is absent or does not validate."""
    record_path = store.record_path(spec.name, key)
    if not store.exists(record_path):
        return None
    record = store.read_json(record_path)
    if (
        record.get("stage") != spec.name
        or record.get("key") != key
        or set(record["outputs"]) != set(spec.outputs)
    ):
        return None
    outputs = {name: Manifest(**fields) for name, fields in record["outputs"].items()}
    return StageRun(
        spec.name, key, store.uri_of(store.stage_dir(spec.name, key)), outputs, record, reused=True
    )


def _seal_output(store: Store, spec: StageSpec, key: str, name: str, schema: ManifestSchema) -> Manifest:
    """Validates every part of one output and digests it (part names and bytes, in name order)."""
    directory = store.output_dir(spec.name, key, name)
    parts = store.list_parts(directory)
    num_rows = 0
    digest_lines = []
    for part in parts:
        with store.fs.open(part, "rb") as handle:
            metadata = pq.ParquetFile(handle).metadata
            part_schema = metadata.schema.to_arrow_schema()
        if not schema.conforms(part_schema):
            raise ManifestError(
                f"stage {spec.name}, output {name}, {part}: schema differs from {schema.name}"
            )
        num_rows += metadata.num_rows
        digest_lines.append(f"{part.rsplit('/', 1)[-1]} {store.file_sha256(part)}")
    store.fs.makedirs(directory, exist_ok=True)  # an output with no parts is an empty manifest
    digest = sha256_text("\n".join([schema.name, str(schema.version), *digest_lines]))
    return Manifest(uri=store.uri_of(directory), schema_name=schema.name, digest=digest, num_rows=num_rows)


def _list_artifacts(store: Store, stage: str, key: str) -> list[str]:
    directory = f"{store.stage_dir(stage, key)}/{ARTIFACTS_DIR}"
    if not store.fs.isdir(directory):
        return []
    return sorted(
        path.rsplit("/", 1)[-1] for path in store.fs.ls(directory, detail=False) if ".tmp-" not in path
    )


def _lvd_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lvd")
    except PackageNotFoundError:
        return "unknown"
