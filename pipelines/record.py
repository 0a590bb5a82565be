"""The stage record `_STAGE.json`: what a commit writes, and how a reuse checks it is still true.

    commit:  every output part validated, sized and hashed --> outputs: {name: {schema_name, digest,
             num_rows, parts: [{name, bytes, sha256}]}}; inputs by location relative to the store root
    reuse:   the record's format, stage, key and output names, and every output folder's part list and
             sizes (one listing per output, no hashing) --> a StageRun whose locations come from where
             the store is now, never from the record
    verify:  the same, plus every part's sha256 (`lvd verify`)

Nothing in a record is an absolute location of the store's own files, so a store copied or moved
elsewhere keeps working, and an edited record cannot point a stage at foreign rows. A record that does
not check out is not a commit: the stage is recomputed (`discard_damaged` first drops what no longer
matches, so finished shards that do match are kept).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.manifest import ManifestError, ManifestSchema, read_manifest, shard_id_of
from pipelines.store import Store, sha256_text

RECORD_FORMAT_VERSION = 2
PARTS_KEY = "parts"


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
class StageRun:
    """A committed stage: its key, folder, inputs and outputs (located in this store), and its record."""

    name: str
    key: str
    uri: str
    outputs: dict[str, Manifest]
    record: dict[str, Any]
    reused: bool
    inputs: dict[str, Manifest] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Part:
    """One committed Parquet part of an output."""

    name: str
    bytes: int
    sha256: str


def seal_output(
    store: Store, stage: str, key: str, name: str, schema: ManifestSchema
) -> tuple[Manifest, list[Part]]:
    """Validates every part of one output and digests it (part names and bytes, in name order)."""
    directory = store.output_dir(stage, key, name)
    num_rows = 0
    parts = []
    for path in store.list_parts(directory):
        with store.fs.open(path, "rb") as handle:
            metadata = pq.ParquetFile(handle).metadata
            part_schema = metadata.schema.to_arrow_schema()
        if not schema.conforms(part_schema):
            raise ManifestError(f"stage {stage}, output {name}, {path}: schema differs from {schema.name}")
        num_rows += metadata.num_rows
        parts.append(Part(path.rsplit("/", 1)[-1], store.fs.size(path), store.file_sha256(path)))
    store.fs.makedirs(directory, exist_ok=True)  # an output with no parts is an empty manifest
    lines = [f"{part.name} {part.sha256}" for part in parts]
    digest = sha256_text("\n".join([schema.name, str(schema.version), *lines]))
    return Manifest(store.uri_of(directory), schema.name, digest, num_rows), parts


def output_entry(manifest: Manifest, parts: list[Part]) -> dict[str, Any]:
    """An output as the record keeps it: no location (the stage's folder gives it), every part's size
    and hash."""
    return {
        "schema_name": manifest.schema_name,
        "digest": manifest.digest,
        "num_rows": manifest.num_rows,
        PARTS_KEY: [dataclasses.asdict(part) for part in parts],
    }


def input_entry(manifest: Manifest, store: Store) -> dict[str, Any]:
    """An input as the record keeps it: below the store root when it lives there, else as given."""
    return {
        "location": store.relative_location(manifest.uri),
        "schema_name": manifest.schema_name,
        "digest": manifest.digest,
        "num_rows": manifest.num_rows,
    }


def located_inputs(record: dict[str, Any], store: Store) -> dict[str, Manifest]:
    """The record's inputs located against this store's root (wherever it is now)."""
    return {
        name: Manifest(
            store.absolute_location(entry["location"]),
            entry["schema_name"],
            entry["digest"],
            entry["num_rows"],
        )
        for name, entry in record.get("inputs", {}).items()
    }


def record_problems(
    store: Store, stage: str, key: str, outputs: tuple[str, ...] | None, *, full: bool = False
) -> tuple[dict[str, Any] | None, list[str]]:
    """The record at (stage, key) and what does not match it on disk ([] when it checks out).

    The cheap check (every reuse) compares each output folder's part names and sizes with the record;
    `full` also hashes every part. `outputs` are the names the stage has now (None: the record's own).
    None and a problem when there is no valid record at all.
    """
    path = store.record_path(stage, key)
    if not store.exists(path):
        return None, ["no record"]
    try:
        record = store.read_json(path)
    except ValueError as err:
        return None, [f"unreadable record: {err}"]
    if not isinstance(record, dict):
        return None, ["the record is not a JSON object"]
    if record.get("format_version") != RECORD_FORMAT_VERSION:
        found = record.get("format_version")
        return None, [
            f"record format {found}, this lvd writes {RECORD_FORMAT_VERSION}: the next run recomputes it"
        ]
    names = sorted(record.get("outputs", {}))
    renamed = outputs is not None and names != sorted(outputs)
    if record.get("stage") != stage or record.get("key") != key or renamed:
        return None, ["the record names another stage, key or outputs"]
    problems = []
    for name, entry in record["outputs"].items():
        parts = entry.get(PARTS_KEY) if isinstance(entry, dict) else None
        if not isinstance(parts, list):
            return None, [f"the record lists no parts for output {name}"]
        problems += _output_problems(store, store.output_dir(stage, key, name), name, parts, full)
    return record, problems


def _output_problems(
    store: Store, directory: str, output: str, recorded: list[dict], full: bool
) -> list[str]:
    expected = {part["name"]: part for part in recorded}
    found = store.part_sizes(directory)
    problems = [f"{output}/{name}: missing" for name in sorted(set(expected) - set(found))]
    problems += [f"{output}/{name}: not in the record" for name in sorted(set(found) - set(expected))]
    for name in sorted(set(expected) & set(found)):
        if found[name] != expected[name]["bytes"]:
            problems.append(f"{output}/{name}: {found[name]} bytes, recorded {expected[name]['bytes']}")
        elif full and store.file_sha256(f"{directory}/{name}") != expected[name]["sha256"]:
            problems.append(f"{output}/{name}: content differs from the recorded sha256")
    return problems


def discard_damaged(
    store: Store, stage: str, key: str, outputs: tuple[str, ...], record: dict[str, Any] | None
) -> None:
    """Makes a stage whose record does not check out resumable: drops the record, and every part (with
    its shard record, so the shard is computed again) that the record does not vouch for; finished
    parts that still match are kept."""
    store.remove(store.record_path(stage, key))
    recorded = (record or {}).get("outputs", {})
    for name in outputs:
        directory = store.output_dir(stage, key, name)
        expected = {part["name"]: part["bytes"] for part in recorded.get(name, {}).get(PARTS_KEY, [])}
        found = store.part_sizes(directory)
        for part in sorted(set(expected) | set(found)):
            if expected.get(part) != found.get(part):
                store.remove(f"{directory}/{part}")
                store.remove(store.shard_record_path(stage, key, shard_id_of(part)))
