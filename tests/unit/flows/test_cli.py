"""The `lvd` command on a real store: stage runs and manifest inspection."""

from __future__ import annotations

import pytest
import yaml

from flows.cli import main
from tests.helpers import three_source_config


@pytest.fixture
def job(tmp_path):
    ingest = three_source_config(tmp_path / "data")
    (tmp_path / "data" / "folder" / "broken.jpg").write_text("not a jpeg")
    config_file = tmp_path / "job.yaml"
    sources = [{"name": s.name, "role": s.role, "kind": s.kind, "path": s.path} for s in ingest.sources]
    config_file.write_text(
        yaml.safe_dump(
            {
                "store": str(tmp_path / "store"),
                "runtime": {"executor": "serial", "show_progress": False},
                "ingest": {"sources": sources, "files_per_shard": 5},
            }
        )
    )
    return ["--config", str(config_file)]


def test_stage_then_manifest_show_head_stats(job, tmp_path, capsys):
    assert main(["stage", "ingest", *job]) == 0
    capsys.readouterr()
    store = ["--store", str(tmp_path / "store")]

    assert main(["manifest", "show", "ingest", *store]) == 0
    shown = capsys.readouterr().out
    assert "images v1" in shown and "rejected v1" in shown and "36 rows" in shown
    assert "not_an_image" in shown  # the reject-reason table

    assert main(["manifest", "head", "ingest/rejected", "-n", "1", *store]) == 0
    assert "broken.jpg" in capsys.readouterr().out

    assert main(["manifest", "stats", "ingest", *store]) == 0
    stats = capsys.readouterr().out
    assert "rejected_by_reason.not_an_image" in stats and "rows.images" in stats

    images_dir = next((tmp_path / "store" / "ingest").glob("*/images"))
    assert main(["manifest", "show", str(images_dir)]) == 0
    assert "36 rows" in capsys.readouterr().out


def test_user_errors_exit_2_with_one_line(job, tmp_path, capsys):
    assert main(["stage", "nosuch", *job]) == 2
    assert capsys.readouterr().err.startswith("lvd: error: unknown stage 'nosuch'")
    assert main(["manifest", "show", "ingest", "--store", str(tmp_path / "empty")]) == 2
    assert "neither a path nor a stage with a committed run" in capsys.readouterr().err
