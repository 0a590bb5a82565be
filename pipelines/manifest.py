"""Parquet manifest schemas, and reading/validating manifests with no lvd code in the reader's way.

A manifest is a folder of Parquet parts (`part-<shard id>.parquet`) that share one explicit, versioned
pyarrow schema. pyarrow, DuckDB (`read_parquet('<dir>/*.parquet')`), Polars and pandas read it as is.
Rows are keyed by `image_id`, the sha256 of the image bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.validation import UserInputError

SCHEMA_NAME_KEY = b"lvd.schema"
SCHEMA_VERSION_KEY = b"lvd.schema_version"
STAGE_RECORD_FILE = "_STAGE.json"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"

# What an image is to the job: a curated seed, a pool image to curate, or an evaluation image.
Role = Literal["curated", "uncurated", "eval"]
ROLES: tuple[str, ...] = get_args(Role)


class ManifestError(UserInputError):
    """A manifest is missing, malformed, or does not match the schema it claims."""


@dataclass(frozen=True, slots=True)
class ManifestSchema:
    """A named, versioned Parquet schema; the name and version travel in the file metadata."""

    name: str
    version: int
    fields: tuple[pa.Field, ...]

    @property
    def arrow(self) -> pa.Schema:
        metadata = {SCHEMA_NAME_KEY: self.name.encode(), SCHEMA_VERSION_KEY: str(self.version).encode()}
        return pa.schema(list(self.fields), metadata=metadata)

    def empty_table(self) -> pa.Table:
        return self.arrow.empty_table()

    def table_from_rows(self, rows: list[dict]) -> pa.Table:
        return pa.Table.from_pylist(rows, schema=self.arrow)

    def validate(self, table: pa.Table) -> pa.Table:
        """Returns `table` with exactly this schema (column order and metadata), or raises ManifestError."""
        expected = [field.name for field in self.fields]
        missing = [name for name in expected if name not in table.column_names]
        extra = [name for name in table.column_names if name not in expected]
        if missing or extra:
            raise ManifestError(
                f"{self.name} v{self.version}: missing columns {missing}, extra columns {extra}"
            )
        try:
            return table.select(expected).cast(self.resolved(table.schema))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise ManifestError(f"{self.name} v{self.version}: {err}") from err

    def resolved(self, actual: pa.Schema) -> pa.Schema:
        """This schema with each embedding column's width taken from `actual` (widths vary by model)."""
        fields = []
        for field in self.fields:
            if field.type == EMBEDDING and field.name in actual.names:
                found = actual.field(field.name).type
                if pa.types.is_fixed_size_list(found) and found.value_type == pa.float16():
                    field = field.with_type(found)
            fields.append(field)
        return pa.schema(fields, metadata=self.arrow.metadata)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(field.name for field in self.fields)

    def conforms(self, actual: pa.Schema) -> bool:
        return actual.equals(self.resolved(actual), check_metadata=False)


# Declared type of embedding columns; stored as fixed_size_list<float16>[dim], dim set by the model.
EMBEDDING = pa.list_(pa.float16())


def embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float16(), dim)


IMAGES = ManifestSchema(
    name="images",
    version=1,
    fields=(
        pa.field("image_id", pa.string(), nullable=False),  # sha256 hex of the bytes
        pa.field("source", pa.string(), nullable=False),
        pa.field("role", pa.string(), nullable=False),  # curated | uncurated | eval
        pa.field("uri", pa.string(), nullable=False),
        pa.field("container", pa.string(), nullable=False),  # file | tar | parquet
        pa.field("byte_offset", pa.int64()),  # tar members: where the bytes start in the archive
        pa.field("byte_size", pa.int64(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),
        pa.field("num_frames", pa.int32(), nullable=False),
    ),
)

# The column a filter stage's reject manifest explains each dropped row with.
REASON_COLUMN = "reason"

REJECTED = ManifestSchema(
    name="rejected",
    version=1,
    fields=(
        pa.field("image_id", pa.string()),  # null when the bytes could not be read at all
        pa.field("source", pa.string(), nullable=False),
        pa.field("role", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field(REASON_COLUMN, pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
    ),
)


# Provenance columns a curated row carries on top of its IMAGES columns; null where not applicable.
PROVENANCE_FIELDS = (
    pa.field("seed_source", pa.string(), nullable=False),
    # as_is | sample | cluster; not `mode`, which IMAGES already uses for the pixel mode
    pa.field("curation_mode", pa.string(), nullable=False),
    pa.field("query_image_id", pa.string()),
    pa.field("similarity", pa.float32()),
    pa.field("rank", pa.int32()),
    pa.field("cluster", pa.int32()),
)

CURATED = ManifestSchema(name="curated", version=1, fields=(*IMAGES.fields, *PROVENANCE_FIELDS))
# Several curated-shaped samples in one manifest, told apart by `replicate` (the data ablation's seeds).
CURATED_REPLICATES = ManifestSchema(
    name="curated_replicates",
    version=1,
    fields=(*CURATED.fields, pa.field("replicate", pa.int32(), nullable=False)),
)

ROW_KEY_COLUMNS = ("image_id", "uri")


def row_order(table: pa.Table, columns: Sequence[str] = ROW_KEY_COLUMNS) -> np.ndarray:
    """Row positions that sort `table` ascending by `columns` (default: the row key), stable."""
    sort_keys = [(name, "ascending") for name in columns]
    return np.asarray(pc.sort_indices(table.select(list(columns)), sort_keys=sort_keys), dtype=np.int64)


def sort_rows(table: pa.Table, columns: Sequence[str] = ROW_KEY_COLUMNS) -> pa.Table:
    """`table` in `row_order`."""
    return table.take(pa.array(row_order(table, columns)))


def align_rows(rows: pa.Table, other: pa.Table, keys: tuple[str, ...] = ROW_KEY_COLUMNS) -> np.ndarray:
    """For each row of `rows`, the index of the row of `other` with the same keys.

    Rows of `other` that `rows` lacks are ignored; a row without exactly one match is an error.
    """
    wanted = rows.select(list(keys)).append_column("_row", pa.array(np.arange(rows.num_rows)))
    found = other.select(list(keys)).append_column("_position", pa.array(np.arange(other.num_rows)))
    joined = wanted.join(found, list(keys), join_type="left outer").sort_by("_row")
    if joined.num_rows != rows.num_rows or joined.column("_position").null_count:
        missing = joined.filter(joined.column("_position").is_null()).column(keys[-1]).to_pylist()[:3]
        raise ManifestError(f"{rows.num_rows} rows but their matches are missing or repeated, e.g. {missing}")
    return np.asarray(joined.column("_position"), dtype=np.int64)


def part_name(shard_id: str) -> str:
    return f"{PART_PREFIX}{shard_id}{PART_SUFFIX}"


def shard_id_of(part: str) -> str:
    """The shard id in a part's file name (`part_name`'s inverse)."""
    return part.removeprefix(PART_PREFIX).removesuffix(PART_SUFFIX)


def _parts(fs: fsspec.AbstractFileSystem, location: str) -> list[str]:
    if fs.isfile(location):
        return [location]
    return sorted(fs.glob(f"{location.rstrip('/')}/*{PART_SUFFIX}"))


def resolve_manifest(path: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """Finds the manifest behind a local path or fsspec URI.

    Accepts a manifest folder, a single part, or a stage folder with exactly one output.
    """
    fs, location = fsspec.core.url_to_fs(str(path))
    record_path = f"{location.rstrip('/')}/{STAGE_RECORD_FILE}"
    if fs.isfile(record_path):
        outputs = json.loads(fs.cat_file(record_path))["outputs"]
        if len(outputs) != 1:
            names = ", ".join(sorted(outputs))
            raise ManifestError(
                f"{path} is a stage with several outputs ({names}); name one: {path}/<output>"
            )
        return fs, f"{location.rstrip('/')}/{next(iter(outputs))}"
    if fs.isdir(location) or (fs.isfile(location) and location.endswith(PART_SUFFIX)):
        return fs, location
    raise ManifestError(f"no manifest at {path}")


def read_manifest(path: str | os.PathLike, schema: ManifestSchema | None = None) -> pa.Table:
    """Reads a whole manifest into one table, validating it against `schema` when given.

    A folder with no parts is a valid empty manifest; `schema` then types the empty table.
    """
    fs, location = resolve_manifest(path)
    parts = _parts(fs, location)
    if not parts:
        if schema is None:
            raise ManifestError(f"{path} has no parts and no schema was given to type an empty table")
        return schema.empty_table()
    table = pq.read_table(parts, filesystem=fs)
    return schema.validate(table) if schema is not None else table


def manifest_schema_info(path: str | os.PathLike) -> tuple[pa.Schema, str | None, int | None]:
    """The Arrow schema of a manifest plus its lvd schema name and version (None for foreign files)."""
    fs, location = resolve_manifest(path)
    parts = _parts(fs, location)
    if not parts:
        raise ManifestError(f"{path} has no Parquet parts")
    schema = pq.read_schema(parts[0], filesystem=fs)
    metadata = schema.metadata or {}
    name = metadata.get(SCHEMA_NAME_KEY)
    version = metadata.get(SCHEMA_VERSION_KEY)
    return schema, name.decode() if name else None, int(version) if version else None
