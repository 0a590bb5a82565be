"""`lvd manifest show|head|stats`: what a manifest holds, as readable tables.

A target is a manifest folder, a part file, a stage folder, or a stage name (optionally
`stage/output`), which resolves to that stage's most recent committed run in the store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.table import Table

from pipelines.manifest import (
    REASON_COLUMN,
    STAGE_RECORD_FILE,
    ManifestError,
    manifest_schema_info,
    read_manifest,
)
from pipelines.store import Store

TOP_VALUES = 3
MAX_CELL_CHARS = 48


@dataclass(frozen=True, slots=True)
class Target:
    manifests: dict[str, str]  # output name -> manifest location
    record: dict | None  # the stage record, when the target is a stage


def resolve_target(target: str, store: Store) -> Target:
    path = Path(target)
    if path.exists() or "://" in target:
        record_path = path / STAGE_RECORD_FILE
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            return Target({name: str(path / name) for name in record["outputs"]}, record)
        return Target({path.name: target}, None)
    stage, _, output = target.partition("/")
    record = latest_record(stage, store)
    outputs = record["outputs"]
    if output and output not in outputs:
        raise ManifestError(f"stage {stage!r} has no output {output!r}; outputs: {', '.join(outputs)}")
    chosen = [output] if output else list(outputs)
    # Where the store is now, never a location written in the record.
    return Target(
        {name: store.uri_of(store.output_dir(stage, record["key"], name)) for name in chosen}, record
    )


def latest_record(stage: str, store: Store) -> dict:
    records = []
    for key in store.list_stage_keys(stage):
        record_path = store.record_path(stage, key)
        if store.exists(record_path):
            records.append(store.read_json(record_path))
    if not records:
        raise ManifestError(f"{stage!r} is neither a path nor a stage with a committed run in {store.uri}")
    return max(records, key=lambda record: record["timings"]["started"])


def schema_table(location: str) -> Table:
    schema, name, version = manifest_schema_info(location)
    title = f"{name} v{version}" if name else "schema (not an lvd manifest)"
    table = Table(title=title, title_justify="left")
    table.add_column("column")
    table.add_column("type")
    table.add_column("nullable")
    for field in schema:
        table.add_row(field.name, str(field.type), "yes" if field.nullable else "no")
    return table


def column_summary_table(data: pa.Table) -> Table:
    table = Table(title=f"{data.num_rows} rows", title_justify="left")
    for column in ("column", "nulls", "distinct", "summary"):
        table.add_column(column)
    for name in data.column_names:
        column = data.column(name)
        table.add_row(name, str(column.null_count), _distinct(column), _summary(column))
    return table


def _distinct(column: pa.ChunkedArray) -> str:
    if pa.types.is_binary(column.type) or pa.types.is_fixed_size_list(column.type):
        return "-"
    return str(pc.count_distinct(column).as_py())


def _summary(column: pa.ChunkedArray) -> str:
    if len(column) == column.null_count:
        return "all null"
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        low, high = pc.min_max(column).values()
        return f"min {low.as_py()}  mean {pc.mean(column).as_py():.4g}  max {high.as_py()}"
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        counts = pc.value_counts(column).to_pylist()
        top = sorted(counts, key=lambda item: -item["counts"])[:TOP_VALUES]
        return "  ".join(f"{_short(str(item['values']))} ({item['counts']})" for item in top)
    return str(column.type)


def reasons_table(data: pa.Table) -> Table | None:
    if REASON_COLUMN not in data.column_names:
        return None
    table = Table(title="rejects by reason", title_justify="left")
    table.add_column("reason")
    table.add_column("rows", justify="right")
    counts = sorted(pc.value_counts(data.column(REASON_COLUMN)).to_pylist(), key=lambda item: -item["counts"])
    for item in counts:
        table.add_row(str(item["values"]), str(item["counts"]))
    return table


def head_table(data: pa.Table, num_rows: int) -> Table:
    table = Table(title=f"first {min(num_rows, data.num_rows)} of {data.num_rows} rows", title_justify="left")
    for name in data.column_names:
        table.add_column(name, overflow="fold")
    for row in data.slice(0, num_rows).to_pylist():
        table.add_row(*(_short(str(value)) for value in row.values()))
    return table


def stats_table(record: dict) -> Table:
    table = Table(title=f"{record['stage']} {record['key']}: stats", title_justify="left")
    table.add_column("stat")
    table.add_column("value", justify="right")
    for name, value in _flatten(record.get("stats", {})):
        table.add_row(name, str(value))
    table.add_row("seconds", str(record["timings"]["seconds"]))
    for name, manifest in record["outputs"].items():
        table.add_row(f"rows.{name}", str(manifest["num_rows"]))
    return table


def _flatten(stats: dict, prefix: str = "") -> list[tuple[str, object]]:
    items: list[tuple[str, object]] = []
    for name, value in stats.items():
        if isinstance(value, dict):
            items += _flatten(value, f"{prefix}{name}.")
        else:
            items.append((f"{prefix}{name}", value))
    return items


def _short(text: str) -> str:
    return text if len(text) <= MAX_CELL_CHARS else f"...{text[-(MAX_CELL_CHARS - 3) :]}"


def show(target: Target, console: Console) -> None:
    for name, location in target.manifests.items():
        console.rule(f"{name}: {location}")
        console.print(schema_table(location))
        data = read_manifest(location)
        console.print(column_summary_table(data))
        reasons = reasons_table(data)
        if reasons is not None:
            console.print(reasons)


def head(target: Target, num_rows: int, console: Console) -> None:
    for name, location in target.manifests.items():
        console.rule(f"{name}: {location}")
        console.print(head_table(read_manifest(location), num_rows))


def stats(target: Target, console: Console) -> None:
    if target.record is None:
        for name, location in target.manifests.items():
            console.rule(f"{name}: {location}")
            console.print(column_summary_table(read_manifest(location)))
        return
    console.print(stats_table(target.record))
