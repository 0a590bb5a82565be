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
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm.auto import tqdm

from pipelines.executor import Executor, SerialExecutor
from pipelines.manifest import ManifestSchema, read_manifest
from pipelines.record import (
    RECORD_FORMAT_VERSION,
    Manifest,
    StageRun,
    discard_damaged,
    input_entry,
    located_inputs,
    output_entry,
    record_problems,
    seal_output,
)
from pipelines.store import TEMP_MARKER, Store, canonical_json, sha256_text
from pipelines.views import FigureView, TableView

KEY_LENGTH = 16
ARTIFACTS_DIR = "artifacts"
WARNINGS_KEY = "warnings"  # the stats entry of a stage's `ctx.warn` messages
logger = logging.getLogger(__name__)


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
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        """Something the user should know although the stage goes on (a value capped, nothing to do):
        logged now, kept in the record's stats under `warnings`, printed by the run summary."""
        logger.warning("%s: %s", self.spec.name, message)
        self.warnings.append(message)

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
    # Why a lock: a second run of the same stage and key (two configs sharing upstream stages) waits for
    # this one and then reuses its commit, instead of both writing, and sweeping, one folder.
    with store.stage_lock(spec.name, key):
        record, problems = record_problems(store, spec.name, key, tuple(spec.outputs))
        if not problems:
            return _committed_run(spec, key, store, record)
        if store.exists(store.record_path(spec.name, key)):
            # A commit that no longer matches its files is no commit: recompute what it cannot vouch for.
            logger.warning("stage %s %s: %s; recomputing", spec.name, key, "; ".join(problems[:3]))
            discard_damaged(store, spec.name, key, tuple(spec.outputs), record)
        store.remove_temp_files(store.stage_dir(spec.name, key))
        return _compute(spec, cfg, inputs, key, store, executor or SerialExecutor(), show_progress)


def _compute(
    spec: StageSpec,
    cfg: Any,
    inputs: Mapping[str, Manifest],
    key: str,
    store: Store,
    executor: Executor,
    show_progress: bool,
) -> StageRun:
    started = time.time()
    ctx = StageContext(spec, key, store, executor, show_progress)
    stats = dict(spec.fn(cfg, inputs, ctx) or {})
    if ctx.warnings:
        stats[WARNINGS_KEY] = ctx.warnings
    sealed = {name: seal_output(store, spec.name, key, name, schema) for name, schema in spec.outputs.items()}
    record = {
        "format_version": RECORD_FORMAT_VERSION,
        "stage": spec.name,
        "version": spec.version,
        "key": key,
        "config": config_to_dict(cfg),
        "inputs": {name: input_entry(manifest, store) for name, manifest in inputs.items()},
        "outputs": {name: output_entry(manifest, parts) for name, (manifest, parts) in sealed.items()},
        "stats": stats,
        "artifacts": _list_artifacts(store, spec.name, key),
        "timings": {"started": started, "seconds": round(time.time() - started, 3)},
        "lvd_version": _lvd_version(),
    }
    store.write_json_atomic(store.record_path(spec.name, key), record)
    outputs = {name: manifest for name, (manifest, _) in sealed.items()}
    stage_uri = store.uri_of(store.stage_dir(spec.name, key))
    return StageRun(spec.name, key, stage_uri, outputs, record, reused=False, inputs=dict(inputs))


def load_committed(spec: StageSpec, key: str, store: Store) -> StageRun | None:
    """The committed run at `key`, or None if it is absent or no longer matches its record (a part
    missing, added or resized: cheap checks only; `lvd verify` hashes every part)."""
    record, problems = record_problems(store, spec.name, key, tuple(spec.outputs))
    return None if problems else _committed_run(spec, key, store, record)


def _committed_run(spec: StageSpec, key: str, store: Store, record: dict[str, Any]) -> StageRun:
    """A committed run located in this store: outputs in the stage's folder, inputs below the root."""
    outputs = {
        name: Manifest(
            store.uri_of(store.output_dir(spec.name, key, name)),
            entry["schema_name"],
            entry["digest"],
            entry["num_rows"],
        )
        for name, entry in record["outputs"].items()
    }
    stage_uri = store.uri_of(store.stage_dir(spec.name, key))
    return StageRun(spec.name, key, stage_uri, outputs, record, True, located_inputs(record, store))


def _list_artifacts(store: Store, stage: str, key: str) -> list[str]:
    directory = f"{store.stage_dir(stage, key)}/{ARTIFACTS_DIR}"
    if not store.fs.isdir(directory):
        return []
    return sorted(
        path.rsplit("/", 1)[-1] for path in store.fs.ls(directory, detail=False) if TEMP_MARKER not in path
    )


def _lvd_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lvd")
    except PackageNotFoundError:
        return "unknown"
