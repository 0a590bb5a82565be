"""run_stage: content keys, free reruns, atomic shard resume after SIGKILL, executors, the registry."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

import curation  # noqa: F401  (registers ingest)
from pipelines.executor import RayExecutor, SerialExecutor
from pipelines.manifest import IMAGES, read_manifest
from pipelines.stage import StageSpec, get_stage, register_stage, run_stage
from pipelines.store import Store
from tests.helpers import three_source_config, write_folder

INGEST = get_stage("ingest")


def _ingest(cfg, store_root: Path, executor=None):
    return run_stage(INGEST, cfg, {}, store=Store(store_root), executor=executor, show_progress=False)


def test_rerun_is_free_and_gives_the_same_digest(tmp_path):
    cfg = three_source_config(tmp_path / "data")
    first = _ingest(cfg, tmp_path / "store")
    second = _ingest(cfg, tmp_path / "store")
    assert not first.reused and second.reused
    assert first.key == second.key
    assert {n: m.digest for n, m in first.outputs.items()} == {n: m.digest for n, m in second.outputs.items()}
    assert first.outputs["images"].num_rows == 36
    record = json.loads((Path(first.uri) / "_STAGE.json").read_text())
    assert record["stats"]["images"] == 36 and record["stats"]["shards"] == 3 + 2 + 3


def test_key_changes_with_config_and_with_source_content(tmp_path):
    cfg = three_source_config(tmp_path / "data")
    base = _ingest(cfg, tmp_path / "store")
    stricter = _ingest(three_source_config(tmp_path / "data", min_side=45), tmp_path / "store")
    assert stricter.key != base.key
    assert stricter.outputs["images"].num_rows == 0  # every test image is 48x40: all below 45 px
    assert stricter.record["stats"]["rejected_by_reason"] == {"too_small": 36}
    write_folder(tmp_path / "data" / "folder", range(12, 13))
    grown = _ingest(cfg, tmp_path / "store")
    assert grown.key != base.key and grown.outputs["images"].num_rows == 37


def test_manifest_is_plain_parquet_for_duckdb_and_pandas(tmp_path):
    import duckdb

    run = _ingest(three_source_config(tmp_path / "data"), tmp_path / "store")
    images_dir = run.outputs["images"].uri
    query = f"select source, count(*) from read_parquet('{images_dir}/*.parquet') group by source order by 1"
    by_source = duckdb.sql(query).fetchall()
    assert by_source == [("pool", 12), ("seeds", 12), ("web", 12)]
    frame = read_manifest(images_dir, IMAGES).to_pandas()
    assert frame["image_id"].str.len().eq(64).all()


def _digests(run):
    return {name: manifest.digest for name, manifest in run.outputs.items()}


def test_serial_and_ray_with_any_worker_count_give_identical_manifests(tmp_path, ray_session):
    cfg = three_source_config(tmp_path / "data")
    serial = _ingest(cfg, tmp_path / "serial", SerialExecutor())
    one_worker = _ingest(cfg, tmp_path / "ray1", RayExecutor(num_workers=1))
    two_workers = _ingest(cfg, tmp_path / "ray2", RayExecutor(num_workers=2))
    assert serial.key == one_worker.key == two_workers.key
    assert _digests(serial) == _digests(one_worker) == _digests(two_workers)
    tables = [read_manifest(run.outputs["images"].uri).sort_by("uri") for run in (serial, two_workers)]
    assert tables[0].equals(tables[1])


KILL_SCRIPT = """
import sys
import curation
from curation.ingest import IngestConfig, SourceConfig
from pipelines.stage import get_stage, run_stage
from pipelines.store import Store
source = SourceConfig(name="big", role="uncurated", kind="folder", path=sys.argv[1])
cfg = IngestConfig(sources=(source,), files_per_shard=2)
run_stage(get_stage("ingest"), cfg, {}, store=Store(sys.argv[2]), show_progress=False)
"""


def test_sigkill_mid_stage_resumes_to_the_same_digest(tmp_path):
    from curation.ingest import IngestConfig, SourceConfig

    folder = tmp_path / "big"
    write_folder(folder, range(120), size=(384, 384))
    killed_store = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(folder), str(killed_store)])
    shard_records: list[Path] = []
    deadline = time.monotonic() + 120
    while len(shard_records) < 5 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
        shard_records = list(killed_store.glob("ingest/*/_shards/*.json"))
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the stage finished before it could be killed"
    assert not list(killed_store.glob("ingest/*/_STAGE.json"))
    finished_before = {path: path.stat().st_mtime_ns for path in killed_store.glob("ingest/*/_shards/*.json")}
    assert 5 <= len(finished_before) < 60

    cfg = IngestConfig(
        sources=(SourceConfig(name="big", role="uncurated", kind="folder", path=str(folder)),),
        files_per_shard=2,
    )
    resumed = _ingest(cfg, killed_store)
    clean = _ingest(cfg, tmp_path / "clean")
    assert _digests(resumed) == _digests(clean)
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in finished_before.items()), (
        "redid finished shards"
    )
    images = read_manifest(resumed.outputs["images"].uri)
    assert images.num_rows == 120 and len(set(images.column("uri").to_pylist())) == 120
    assert not list(killed_store.rglob("*.tmp-*"))


def test_registry_refuses_a_duplicate_name():
    @dataclass(frozen=True)
    class Nothing:
        pass

    spec = StageSpec(
        name="ingest",
        version=1,
        config_type=Nothing,
        fn=lambda cfg, inputs, ctx: None,
        inputs={},
        outputs={},
        description="clash",
    )
    with pytest.raises(ValueError, match="already registered"):
        register_stage(spec)


def test_fan_in_stage_and_empty_output(tmp_path):
    @dataclass(frozen=True)
    class Count:
        copies: int

    def count_images(cfg, inputs, ctx):
        images = inputs["images"].read(IMAGES)
        if cfg.copies:  # zero copies writes no part at all: the output must still commit, empty
            ctx.write_output("images", pa.concat_tables([images] * cfg.copies))
        return {"rows_in": images.num_rows}

    spec = StageSpec(
        name="test_fan_in",
        version=1,
        config_type=Count,
        fn=count_images,
        inputs={"images": IMAGES},
        outputs={"images": IMAGES},
        description="test only",
    )
    ingest = _ingest(three_source_config(tmp_path / "data"), tmp_path / "store")
    store = Store(tmp_path / "store")
    doubled = run_stage(spec, Count(copies=2), {"images": ingest.outputs["images"]}, store=store)
    assert doubled.outputs["images"].num_rows == 72 and doubled.record["stats"]["rows_in"] == 36
    nothing = run_stage(spec, Count(copies=0), {"images": ingest.outputs["images"]}, store=store)
    assert nothing.outputs["images"].num_rows == 0
    assert read_manifest(nothing.outputs["images"].uri, IMAGES).num_rows == 0


def test_an_fsspec_store_gives_the_same_manifests_as_a_folder(tmp_path):
    cfg = three_source_config(tmp_path / "data")
    local = _ingest(cfg, tmp_path / "store")
    in_memory = run_stage(INGEST, cfg, {}, store=Store("memory://lvd-test-store"), show_progress=False)
    assert in_memory.uri.startswith("memory://")
    assert _digests(in_memory) == _digests(local)
    assert read_manifest(in_memory.outputs["images"].uri).equals(read_manifest(local.outputs["images"].uri))
    again = run_stage(INGEST, cfg, {}, store=Store("memory://lvd-test-store"), show_progress=False)
    assert again.reused


def test_an_input_of_another_schema_is_refused_before_anything_runs(tmp_path):
    ingest = _ingest(three_source_config(tmp_path / "data"), tmp_path / "store")
    rejects = ingest.outputs["rejected"]  # a `rejected` manifest where `images` is due
    with pytest.raises(
        ValueError, match="input images takes a manifest of schema images, got one of schema rejected"
    ):
        run_stage(
            get_stage("exact_dedup"),
            get_stage("exact_dedup").config_type(),
            {"images": rejects},
            store=Store(tmp_path / "store"),
        )
    assert not (tmp_path / "store" / "exact_dedup").exists()
