"""What a careless user hands lvd gets one `lvd: error:` line and exit status 2, and nothing is committed;
what is merely odd gets a warning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from flows.cli import USER_ERROR_EXIT, main
from tests.helpers import limit_file_size, three_source_config

# A store path no process can create (sysfs refuses new folders, even to root).
UNWRITABLE_STORE = "/sys/lvd-test-store"


def write_job(tmp_path: Path, sources: list[dict]) -> Path:
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "store": str(tmp_path / "store"),
                "runtime": {"executor": "serial", "show_progress": False},
                "ingest": {"sources": sources},
            }
        )
    )
    return config


def one_error_line(capsys) -> str:
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("lvd: error: ")
    return line


def nothing_committed(tmp_path: Path) -> bool:
    return not list(tmp_path.rglob("_STAGE.json"))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (pa.table({"image": [1, 2]}), "column 'image' of {path} holds int64, not image bytes (binary)"),
        (pa.table({"image": ["a"]}), "column 'image' of {path} holds string, not image bytes (binary)"),
        (pa.table({"image": [[1]]}), "column 'image' of {path} holds list<element: int64>, not image bytes"),
        (pa.table({"jpg": [b"x"]}), "{path} has no column 'image' (set bytes_column); columns: jpg"),
        (None, "{path} is not a readable Parquet file"),
    ],
    ids=["int", "string", "list", "missing", "not-parquet"],
)
def test_a_parquet_source_without_image_bytes_is_one_line(tmp_path, capsys, table, message):
    path = tmp_path / "web.parquet"
    if table is None:
        path.write_text("a,b\n1,2\n")
    else:
        pq.write_table(table, path)
    config = write_job(tmp_path, [{"name": "web", "role": "uncurated", "kind": "parquet", "path": str(path)}])
    assert main(["stage", "ingest", "--config", str(config)]) == USER_ERROR_EXIT
    assert one_error_line(capsys).startswith(f"lvd: error: source 'web': {message.format(path=path)}")
    assert nothing_committed(tmp_path)


def test_a_store_that_cannot_be_written_fails_before_any_work(tmp_path, capsys):
    sources = [
        {"name": s.name, "role": s.role, "kind": s.kind, "path": s.path}
        for s in three_source_config(tmp_path / "data").sources
    ]
    config = write_job(tmp_path, sources)
    assert main(["run", "--config", str(config), "--set", f"store={UNWRITABLE_STORE}"]) == USER_ERROR_EXIT
    assert (
        one_error_line(capsys)
        == f"lvd: error: store {UNWRITABLE_STORE}: cannot write there: Operation not permitted"
    )


@pytest.mark.timeout(120)
def test_a_store_that_fills_up_mid_stage_is_one_line_and_commits_nothing(tmp_path):
    sources = [
        {"name": s.name, "role": s.role, "kind": s.kind, "path": s.path}
        for s in three_source_config(tmp_path / "data").sources
    ]
    config = write_job(tmp_path, sources)
    lvd = Path(sys.executable).parent / "lvd"
    result = subprocess.run(
        [str(lvd), "stage", "ingest", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=100,
        preexec_fn=limit_file_size,
    )
    assert result.returncode == USER_ERROR_EXIT, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"lvd: error: {tmp_path / 'store' / 'ingest'}/") and line.endswith(
        ": File too large"
    )
    assert nothing_committed(tmp_path)
    assert not list((tmp_path / "store").rglob("*.tmp-*"))


def test_a_source_with_no_images_commits_empty_stages_and_says_so(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = write_job(
        tmp_path, [{"name": "crawl", "role": "uncurated", "kind": "folder", "path": str(empty)}]
    )
    assert main(["stage", "ingest", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "warning: ingest: no images in any source (crawl): every later stage has nothing to work on" in out
