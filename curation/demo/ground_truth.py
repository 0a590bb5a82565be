"""The demo's answer key: one row per file, tar member or Parquet row written, and where it came from.

Rows are collected with locations relative to the output folder (the build writes into a temporary
folder first), and become URIs, computed exactly as lvd's ingest computes them, only when written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.images import folder_uri, parquet_uri, tar_uri

# Source names, also the names lvd's ingest gives these sources in the demo preset.
SEED_FASHION = "seed_fashion"
SEED_TUXPAINT = "seed_tuxpaint"
POOL_SHARDS = "pool_shards"
POOL_ICONS = "pool_icons"
POOL_WEB = "pool_web"
POOL_JUNK = "pool_junk"
EVAL_FASHION_TEST = "eval_fashion_test"
SOURCES = (SEED_FASHION, SEED_TUXPAINT, POOL_SHARDS, POOL_ICONS, POOL_WEB, POOL_JUNK, EVAL_FASHION_TEST)

ORIGIN_FASHION_TRAIN = "fashion_mnist_train"
ORIGIN_FASHION_TEST = "fashion_mnist_test"
ORIGIN_TUXPAINT = "tuxpaint"
ORIGIN_OPENCLIPART = "openclipart"
ORIGIN_ADWAITA = "adwaita"
ORIGIN_SYNTHETIC = "synthetic"

KIND_ORIGINAL = "original"
KIND_EXACT_COPY = "exact_copy"
KIND_NEAR_COPY = "near_copy"
KIND_EVAL_NEAR_COPY = "eval_near_copy"
KIND_CORRUPT = "corrupt"
KINDS = (KIND_ORIGINAL, KIND_EXACT_COPY, KIND_NEAR_COPY, KIND_EVAL_NEAR_COPY, KIND_CORRUPT)
NO_LABEL_ID = -1

GROUND_TRUTH_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("sha256", pa.string()),
        pa.field("origin", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("label_id", pa.int32(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("copy_of_sha256", pa.string()),
        pa.field("copy_of_uri", pa.string()),
        pa.field("transform", pa.string()),
        pa.field("expected_reject", pa.string()),
        pa.field("group", pa.string()),
    ]
)


@dataclass(frozen=True, slots=True)
class Location:
    """Where bytes were written, relative to the output folder: a file, a tar member or a Parquet row."""

    layout: Literal["folder", "tar", "parquet"]
    path: str
    member: str = ""
    row: int = 0

    def uri(self, root: Path) -> str:
        """The URI lvd's ingest gives these bytes once the output folder is at `root`."""
        path = root / self.path
        if self.layout == "tar":
            return tar_uri(path, self.member)
        if self.layout == "parquet":
            return parquet_uri(path, self.row)
        return folder_uri(path)


@dataclass(frozen=True, slots=True)
class TruthRow:
    """One ground-truth row before URIs are known. `copy_of` locates the original of a copy."""

    source: str
    location: Location
    sha256: str | None
    origin: str
    kind: str
    label: str | None = None
    label_id: int = NO_LABEL_ID
    copy_of: Location | None = None
    copy_of_sha256: str | None = None
    transform: str | None = None
    expected_reject: str | None = None
    group: str | None = None


def mark_exact_copies(rows: Iterable[TruthRow]) -> list[TruthRow]:
    """Relabels every "original" whose bytes were already written earlier (in row order) as an exact copy.

    Why: the byte-identical clip-art groups are planned, but real sources also repeat themselves by
    accident (the same icon under two names); the answer key must say so either way. Copies point at the
    first row with the same bytes, so the row order given here decides which one is the original.
    """
    first_seen: dict[str, TruthRow] = {}
    marked = []
    for row in rows:
        if row.kind == KIND_CORRUPT or row.sha256 is None:
            marked.append(row)
            continue
        first = first_seen.setdefault(row.sha256, row)
        if first is not row and row.kind == KIND_ORIGINAL:
            row = dataclasses.replace(
                row, kind=KIND_EXACT_COPY, copy_of=first.location, copy_of_sha256=first.sha256, transform=None
            )
        marked.append(row)
    return marked


def ground_truth_table(rows: Iterable[TruthRow], root: Path) -> pa.Table:
    """The rows as a table with `GROUND_TRUTH_SCHEMA`, URIs resolved against the final folder `root`."""
    columns: dict[str, list[object]] = {field.name: [] for field in GROUND_TRUTH_SCHEMA}
    for row in rows:
        columns["source"].append(row.source)
        columns["uri"].append(row.location.uri(root))
        columns["sha256"].append(row.sha256)
        columns["origin"].append(row.origin)
        columns["label"].append(row.label)
        columns["label_id"].append(row.label_id)
        columns["kind"].append(row.kind)
        columns["copy_of_sha256"].append(row.copy_of_sha256)
        columns["copy_of_uri"].append(None if row.copy_of is None else row.copy_of.uri(root))
        columns["transform"].append(row.transform)
        columns["expected_reject"].append(row.expected_reject)
        columns["group"].append(row.group)
    return pa.Table.from_pydict(columns, schema=GROUND_TRUTH_SCHEMA)


def write_ground_truth(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, compression="zstd")
