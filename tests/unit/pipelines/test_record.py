"""A committed stage is reused only while its files are what its record says, and the store may move."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from flows.cli import main
from flows.curate_and_train import CURATE_AND_TRAIN
from flows.dag import run_pipeline
from pipelines.record import RECORD_FORMAT_VERSION
from tests.helpers import three_source_config

IMAGES_WRITTEN = 36  # three_source_config's distinct images
UNTIL = "exact_dedup"


def job_config(root: Path, store: Path):
    ingest = three_source_config(root / "data")
    sources = [{"name": s.name, "role": s.role, "kind": s.kind, "path": s.path} for s in ingest.sources]
    return CURATE_AND_TRAIN.build_config(
        {
            "store": str(store),
            "runtime": {"show_progress": False},
            "ingest": {"sources": sources, "files_per_shard": 5},
        }
    )


def _digests(runs) -> dict[str, dict[str, str]]:
    return {stage: {name: m.digest for name, m in run.outputs.items()} for stage, run in runs.items()}


def _parts(run, output: str) -> list[Path]:
    return sorted(Path(run.outputs[output].uri).glob("part-*.parquet"))


@pytest.fixture
def committed(tmp_path):
    cfg = job_config(tmp_path, tmp_path / "store")
    return cfg, run_pipeline(CURATE_AND_TRAIN, cfg, until=UNTIL)


def test_a_deleted_part_is_recomputed_and_the_next_stage_sees_every_row(committed):
    cfg, first = committed
    _parts(first["ingest"], "images")[0].unlink()
    changed = replace(
        cfg, exact_dedup=replace(cfg.exact_dedup, keep=replace(cfg.exact_dedup.keep, prefer_larger=False))
    )
    second = run_pipeline(CURATE_AND_TRAIN, changed, until=UNTIL)
    assert not second["ingest"].reused and second["ingest"].key == first["ingest"].key
    assert _digests(second)["ingest"] == _digests(first)["ingest"]
    assert second["exact_dedup"].record["stats"]["rows_in"] == IMAGES_WRITTEN
    assert second["exact_dedup"].inputs["images"].num_rows == IMAGES_WRITTEN


def test_a_truncated_part_is_recomputed_not_reused(committed):
    cfg, first = committed
    part = _parts(first["ingest"], "images")[1]
    part.write_bytes(part.read_bytes()[:100])
    second = run_pipeline(CURATE_AND_TRAIN, cfg, until=UNTIL)
    assert not second["ingest"].reused and second["exact_dedup"].reused
    assert _digests(second) == _digests(first)


def test_an_added_part_is_no_part_of_the_commit(committed):
    cfg, first = committed
    stray = Path(first["exact_dedup"].outputs["images"].uri) / "part-stray.parquet"
    shutil.copy(_parts(first["ingest"], "images")[0], stray)
    second = run_pipeline(CURATE_AND_TRAIN, cfg, until=UNTIL)
    assert second["ingest"].reused and not second["exact_dedup"].reused
    assert not stray.exists() and _digests(second) == _digests(first)


def test_a_copied_or_moved_store_works_and_records_name_no_store_path(committed, tmp_path):
    cfg, first = committed
    records = "".join(path.read_text() for path in (tmp_path / "store").rglob("_STAGE.json"))
    assert str(tmp_path / "store") not in records  # locations are relative to the store root
    moved = tmp_path / "elsewhere" / "store"
    shutil.move(tmp_path / "store", moved)
    again = run_pipeline(CURATE_AND_TRAIN, replace(cfg, store=str(moved)), until=UNTIL)
    assert all(run.reused for run in again.values()) and _digests(again) == _digests(first)
    assert again["exact_dedup"].outputs["images"].uri.startswith(str(moved))
    assert again["exact_dedup"].inputs["images"].uri == again["ingest"].outputs["images"].uri
    assert again["exact_dedup"].outputs["images"].read().num_rows == IMAGES_WRITTEN


def test_a_record_of_an_older_format_is_no_commit(committed):
    cfg, first = committed
    record_path = Path(first["exact_dedup"].uri) / "_STAGE.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "format_version": RECORD_FORMAT_VERSION - 1}))
    second = run_pipeline(CURATE_AND_TRAIN, cfg, until=UNTIL)
    assert second["ingest"].reused and not second["exact_dedup"].reused
    assert _digests(second) == _digests(first)


def test_verify_hashes_every_part_and_exits_nonzero_on_damage(committed, capsys):
    cfg, first = committed
    store = ["--store", cfg.store]
    assert main(["verify", *store]) == 0
    assert "2 committed stage runs checked, 0 damaged" in capsys.readouterr().out
    # Same size, other content: reuse's cheap check cannot see it, verify does.
    changed = _parts(first["ingest"], "images")[0]
    data = bytearray(changed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    changed.write_bytes(bytes(data))
    missing = _parts(first["exact_dedup"], "rejected")[0]
    missing.unlink()
    assert main(["verify", *store]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED ingest/{first['ingest'].key}: images/{changed.name}: content differs" in out
    assert f"DAMAGED exact_dedup/{first['exact_dedup'].key}: rejected/{missing.name}: missing" in out
    assert main(["verify", "ingest", *store]) == 1  # one stage
    assert "1 committed stage runs checked, 1 damaged" in capsys.readouterr().out
