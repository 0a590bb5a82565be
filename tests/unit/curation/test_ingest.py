"""ingest: every source kind, every corrupt-input kind, and URIs that read back to the same bytes."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

import pytest

import curation  # noqa: F401  (registers ingest)
from curation.demo.corrupt import write_corrupt_cases
from curation.ingest import IngestConfig, ShardInput, SourceConfig, ingest_shard
from pipelines.images import DecodeLimits, load_rgb, read_bytes
from pipelines.manifest import IMAGES, REJECTED, read_manifest
from pipelines.stage import get_stage, run_stage
from pipelines.store import Store
from tests.helpers import three_source_config, write_folder, write_parquet, write_tar

NOBODY_UID = 65534
LIMITS = DecodeLimits(max_pixels=IngestConfig().max_pixels, min_side=IngestConfig().min_side)


def _ingest(cfg, store_root):
    return run_stage(get_stage("ingest"), cfg, {}, store=Store(store_root), show_progress=False)


def test_every_uri_reads_back_the_bytes_it_was_hashed_from(tmp_path):
    run = _ingest(three_source_config(tmp_path / "data"), tmp_path / "store")
    images = read_manifest(run.outputs["images"].uri, IMAGES).to_pylist()
    assert {row["container"] for row in images} == {"file", "tar", "parquet"}
    for row in images:
        by_uri = read_bytes(row["uri"])
        assert hashlib.sha256(by_uri).hexdigest() == row["image_id"]
        assert len(by_uri) == row["byte_size"]
        if row["container"] == "tar":
            assert read_bytes(row["uri"], row["byte_offset"], row["byte_size"]) == by_uri
    assert read_manifest(run.outputs["rejected"].uri, REJECTED).num_rows == 0  # tar captions are not images


def test_every_corrupt_kind_gets_its_outcome_and_the_stage_completes(tmp_path):
    cases = write_corrupt_cases(tmp_path / "junk")
    assert len(cases) >= 12
    source = SourceConfig(name="junk", role="uncurated", kind="folder", path=str(tmp_path / "junk"))
    run = _ingest(IngestConfig(sources=(source,)), tmp_path / "store")
    images = {Path(row["uri"]).name: row for row in read_manifest(run.outputs["images"].uri).to_pylist()}
    rejected = {Path(row["uri"]).name: row for row in read_manifest(run.outputs["rejected"].uri).to_pylist()}
    assert len(images) + len(rejected) == len(cases), "an input was dropped without a record"
    for case in cases:
        if case.expected_reason is None:
            row = images[case.filename]
            assert (row["width"], row["height"]) == case.expected_size, case.kind
            upright = load_rgb((tmp_path / "junk" / case.filename).read_bytes())
            assert upright.mode == "RGB" and upright.size == case.expected_size, case.kind
        else:
            assert rejected[case.filename]["reason"] == case.expected_reason, case.kind
            assert rejected[case.filename]["detail"], case.kind
    assert images["animated_gif.gif"]["num_frames"] > 1
    assert images["cmyk_jpeg.jpg"]["mode"] == "CMYK"
    reasons = run.record["stats"]["rejected_by_reason"]
    assert sum(reasons.values()) == len(rejected)


def _ingest_as_nobody(path: str, results) -> None:
    os.setuid(NOBODY_UID)  # root reads every file whatever its mode: drop to an ordinary user first
    shard = ShardInput(source="locked", role="uncurated", kind="folder", uris=(path,))
    results.put(ingest_shard(LIMITS, shard).tables["rejected"].to_pylist())


def test_unreadable_permissions_give_an_unreadable_row(tmp_path):
    shared = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's tmp_path is private to root
    try:
        shared.chmod(0o755)
        locked = shared / "locked.png"
        shutil.copy(Path(__file__).parent / "__init__.py", locked)
        locked.chmod(0)
        if os.geteuid() == 0:
            context = multiprocessing.get_context("fork")
            results = context.Queue()
            child = context.Process(target=_ingest_as_nobody, args=(str(locked), results))
            child.start()
            rows = results.get(timeout=60)
            child.join()
        else:
            shard = ShardInput(source="locked", role="uncurated", kind="folder", uris=(str(locked),))
            rows = ingest_shard(LIMITS, shard).tables["rejected"].to_pylist()
    finally:
        shutil.rmtree(shared)
    assert [(row["reason"], row["image_id"]) for row in rows] == [("unreadable", None)]
    assert "PermissionError" in rows[0]["detail"]


def test_a_missing_source_path_fails_with_its_name(tmp_path):
    source = SourceConfig(name="ghost", role="uncurated", kind="folder", path=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="ghost"):
        _ingest(IngestConfig(sources=(source,)), tmp_path / "store")


def test_a_hash_sign_in_folder_names_does_not_break_container_uris(tmp_path):
    cfg = three_source_config(tmp_path / "run#1")
    images = read_manifest(_ingest(cfg, tmp_path / "store").outputs["images"].uri).to_pylist()
    assert len(images) == 36
    for row in images:
        assert hashlib.sha256(read_bytes(row["uri"])).hexdigest() == row["image_id"]


@pytest.mark.timeout(60)  # a FIFO opened for reading would block forever; /dev/zero never ends
def test_special_files_and_oversized_ones_are_rejected_unread(tmp_path):
    folder = tmp_path / "odd"
    write_folder(folder, range(2))  # two ordinary images beside the odd files
    os.mkfifo(folder / "fifo.jpg")
    (folder / "zero.jpg").symlink_to("/dev/zero")
    (folder / "big.png").write_bytes(b"\x89PNG" + b"\0" * 20_000)
    tar, parquet = write_tar(tmp_path / "a.tar", range(2)), write_parquet(tmp_path / "w.parquet", range(2))
    sources = (
        SourceConfig(name="odd", role="uncurated", kind="folder", path=str(folder)),
        SourceConfig(name="shards", role="uncurated", kind="tar", path=str(tar)),
        SourceConfig(name="web", role="uncurated", kind="parquet", path=str(parquet)),
    )
    max_bytes = 10_000  # every image written here is about 6 kB; big.png is over
    run = _ingest(IngestConfig(sources=sources, max_bytes=max_bytes), tmp_path / "store")
    rejected = {Path(row["uri"]).name: row for row in read_manifest(run.outputs["rejected"].uri).to_pylist()}
    assert {name: row["reason"] for name, row in rejected.items()} == {
        "fifo.jpg": "not_a_file",
        "zero.jpg": "not_a_file",
        "big.png": "too_many_bytes",
    }
    assert rejected["big.png"]["detail"] == f"20004 bytes, limit {max_bytes}"
    assert run.outputs["images"].num_rows == 6  # two per source
    # The same limit stops oversized tar members and Parquet cells unread.
    tiny = _ingest(IngestConfig(sources=sources[1:], max_bytes=16), tmp_path / "tiny")
    reasons = read_manifest(tiny.outputs["rejected"].uri).column("reason").to_pylist()
    assert reasons == ["too_many_bytes"] * 4 and tiny.outputs["images"].num_rows == 0
