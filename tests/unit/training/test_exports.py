"""Exports name files inside the store relative to the manifest, so a moved store's exports resolve."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.record import Manifest
from training.exports import EXPORTS, exports_table, read_exports


def _row(path: Path, checkpoint: Path | None) -> dict:
    return {
        "model": "teacher",
        "path": str(path),
        "sha256": "0" * 64,
        "arch": "vit_test",
        "build_options": "{}",
        "parameters": 1,
        "checkpoint": None if checkpoint is None else str(checkpoint),
    }


def test_files_in_the_store_are_relative_to_the_manifest_and_resolve_after_a_move(tmp_path):
    store = tmp_path / "store"
    exports_dir = store / "distill" / "k2" / "exports"
    exports_dir.mkdir(parents=True)
    own = store / "pretrain" / "k1" / "artifacts" / "backbone.pth"
    foreign = tmp_path / "downloads" / "dinov2_vitg14_pretrain.pth"
    table = exports_table(
        [_row(own, store / "pretrain" / "k1" / "run"), _row(foreign, None)], str(exports_dir), str(store)
    )
    assert table.column("path").to_pylist() == ["../../../pretrain/k1/artifacts/backbone.pth", str(foreign)]
    assert table.column("checkpoint").to_pylist() == ["../../../pretrain/k1/run", None]
    pq.write_table(EXPORTS.validate(table), exports_dir / "part-all.parquet")
    moved = tmp_path / "elsewhere"
    shutil.move(store, moved)
    manifest = Manifest(str(moved / "distill" / "k2" / "exports"), EXPORTS.name, "digest", 2)
    rows = read_exports(manifest)
    assert [row["path"] for row in rows] == [str(moved / "pretrain/k1/artifacts/backbone.pth"), str(foreign)]
    assert rows[0]["checkpoint"] == str(moved / "pretrain/k1/run")
