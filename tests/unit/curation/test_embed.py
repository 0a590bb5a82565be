"""The `embed` stage: one unit float16 embedding per image, resumable per shard, Serial equal to Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

import curation  # noqa: F401  (registers ingest and embed)
from curation.embed import EmbedConfig
from curation.embedders import EmbedderConfig
from pipelines.executor import RayExecutor, SerialExecutor
from pipelines.stage import get_stage, run_stage
from pipelines.store import Store
from tests.helpers import three_source_config
from training.models.vit import build_vit

ROWS_PER_SHARD = 10
NUM_IMAGES = 36
# float16 storage: a unit vector's norm is off 1 by a few units in the 3rd decimal at most.
FP16_NORM_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, object, EmbedConfig]:
    """An ingested three-source images manifest and a random hub-format vit_test weights file."""
    root = tmp_path_factory.mktemp("embed")
    ingest_cfg = three_source_config(root / "data")
    images = run_stage(get_stage("ingest"), ingest_cfg, {}, store=Store(root / "store"), show_progress=False)
    torch.manual_seed(0)
    weights = root / "dinov2_vittest14_pretrain.pth"
    torch.save(build_vit("vit_test", patch_size=14, img_size=518).state_dict(), weights)
    embedder = EmbedderConfig(kind="vit", arch="vit_test", path=str(weights), image_size=28, batch_size=4)
    return root, images.outputs["images"], EmbedConfig(embedder=embedder, rows_per_shard=ROWS_PER_SHARD)


def _embed(cfg: EmbedConfig, images, store_root: Path, executor=None):
    return run_stage(
        get_stage("embed"),
        cfg,
        {"images": images},
        store=Store(store_root),
        executor=executor,
        show_progress=False,
    )


def _vectors(table: pa.Table) -> np.ndarray:
    column = table.column("embedding").combine_chunks()
    return np.asarray(column.flatten(), dtype=np.float32).reshape(len(column), column.type.list_size)


def test_every_image_gets_one_unit_float16_embedding_and_a_rerun_is_free(setup, tmp_path):
    _, images, cfg = setup
    run = _embed(cfg, images, tmp_path / "store")
    table = run.outputs["embeddings"].read()
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 64)
    assert sorted(zip(table["image_id"].to_pylist(), table["uri"].to_pylist(), strict=True)) == sorted(
        zip(images.read()["image_id"].to_pylist(), images.read()["uri"].to_pylist(), strict=True)
    )
    np.testing.assert_allclose(np.linalg.norm(_vectors(table), axis=1), 1.0, atol=FP16_NORM_TOLERANCE)
    stats = run.record["stats"]
    assert stats["rows"] == NUM_IMAGES and stats["dim"] == 64
    assert stats["roles"] == {"curated": 12, "uncurated": 24}
    assert stats["images_per_worker_second"] > 0
    rerun = _embed(cfg, images, tmp_path / "store")
    assert rerun.reused and rerun.outputs["embeddings"].digest == run.outputs["embeddings"].digest


def test_serial_and_ray_actors_give_identical_embeddings(setup, tmp_path, ray_session):
    _, images, cfg = setup
    serial = _embed(cfg, images, tmp_path / "serial", SerialExecutor())
    parallel = _embed(cfg, images, tmp_path / "ray", RayExecutor(num_workers=2))
    assert serial.key == parallel.key
    assert serial.outputs["embeddings"].digest == parallel.outputs["embeddings"].digest


def test_a_partial_run_resumes_to_the_same_digest(setup, tmp_path):
    _, images, cfg = setup
    store = Store(tmp_path / "store")
    full = _embed(cfg, images, tmp_path / "store")
    stage_dir = Path(full.uri)
    records = sorted((stage_dir).rglob("*.json"))
    shard_records = [path for path in records if path.name != "_STAGE.json"]
    assert len(shard_records) == -(-NUM_IMAGES // ROWS_PER_SHARD)
    # Simulate a run killed before its last shard and the commit: one shard and the record are gone.
    missing = shard_records[0].stem
    Path(store.part_path("embed", full.key, "embeddings", missing)).unlink()
    shard_records[0].unlink()
    Path(store.record_path("embed", full.key)).unlink()
    finished = sorted(Path(full.outputs["embeddings"].uri).glob("*.parquet")) + shard_records[1:]
    written = {path: path.stat().st_mtime_ns for path in finished}
    resumed = _embed(cfg, images, tmp_path / "store")
    assert not resumed.reused
    assert resumed.outputs["embeddings"].digest == full.outputs["embeddings"].digest
    assert resumed.record["stats"]["rows"] == NUM_IMAGES
    # Only the missing shard was computed again: every finished part and record is the file it was.
    assert {path: path.stat().st_mtime_ns for path in finished} == written
    assert Path(store.part_path("embed", full.key, "embeddings", missing)).is_file()
