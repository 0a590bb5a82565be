"""Small builders of real image files for tests: folders, tar shards and Parquet sources."""

from __future__ import annotations

import io
import resource
import signal
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curation.demo import DemoDataConfig
from curation.ingest import IngestConfig, SourceConfig
from flows.curate_and_train import CURATE_AND_TRAIN, CurateAndTrainConfig
from pipelines.executor import SerialExecutor
from pipelines.stage import StageContext, StageSpec
from pipelines.store import Store
from tests.training_helpers import tiny_training_sections


def png_bytes(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    """A distinct, noisy RGB PNG: noise makes every seed's bytes (and sha256) different."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_folder(root: Path, seeds: range, size: tuple[int, int] = (48, 40)) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        path = root / f"sub{seed % 3}" / f"img{seed:05d}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(png_bytes(seed, size))
        paths.append(path)
    return paths


def write_tar(path: Path, seeds: range) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for seed in seeds:
            data = png_bytes(seed)
            info = tarfile.TarInfo(f"{seed:08d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            caption = f"caption {seed}".encode()
            info = tarfile.TarInfo(f"{seed:08d}.txt")  # WebDataset side files are not images
            info.size = len(caption)
            tar.addfile(info, io.BytesIO(caption))
    return path


def write_parquet(path: Path, seeds: range, row_group_size: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {"key": [str(seed) for seed in seeds], "image": pa.array([png_bytes(s) for s in seeds], pa.binary())}
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def three_source_config(root: Path, **options) -> IngestConfig:
    """A folder, two tar shards and a Parquet file with 36 distinct images in all."""
    write_folder(root / "folder", range(0, 12))
    write_tar(root / "tars" / "pool-000000.tar", range(100, 106))
    write_tar(root / "tars" / "pool-000001.tar", range(106, 112))
    write_parquet(root / "web.parquet", range(200, 212))
    sources = (
        SourceConfig(name="seeds", role="curated", kind="folder", path=str(root / "folder")),
        SourceConfig(name="pool", role="uncurated", kind="tar", path=str(root / "tars")),
        SourceConfig(name="web", role="uncurated", kind="parquet", path=str(root / "web.parquet")),
    )
    return IngestConfig(sources=sources, **{"files_per_shard": 5, "row_groups_per_shard": 1, **options})


# A demo scenario small enough to build in about a second, with every kind of row present.
SMALL_DEMO = DemoDataConfig(
    seed=7,
    # Three classes, not the demo's ten: a pool this small could not give the data ablation's random arm
    # a sample as large as a ten-class curated set.
    seed_fashion_classes=("Trouser", "Sneaker", "Bag"),
    seed_fashion_per_class=3,
    seed_tuxpaint_count=4,
    pool_fashion_count=30,
    pool_clipart_count=20,
    clipart_duplicate_groups=3,
    pool_near_copy_count=10,
    eval_count=25,
    eval_near_copy_count=5,
    shard_size=16,
    icon_name_count=3,
    web_fashion_count=10,
    web_exact_copy_count=4,
    web_row_group_size=4,
)


# Pretraining steps when a test runs the whole DAG: enough to train, checkpoint and export.
TINY_DAG_STEPS = 2


# The copy descriptor of the tests' demo runs: a few steps on small crops (the stage's path, not its quality).
TINY_DESCRIPTOR = {"image_size": 64, "train": {"steps": 3, "batch_size": 8}}


# Why not the demo's 16 neighbours per Fashion-MNIST seed: the test scenarios' pools hold a few dozen
# images per class, which 16 per seed would exhaust (retrieval shares would measure the pool, and the
# curated set would outgrow the pool the data ablation samples its random arm from).
TEST_DEMO_NEIGHBOURS = 4


def demo_job_config(data: Path, store: Path, **ingest_options) -> CurateAndTrainConfig:
    """The demo preset pointed at demo data built under `data`, serial and quiet, storing under `store`,
    with a tiny pretraining run."""
    preset = CURATE_AND_TRAIN.resolve_config("demo")
    tiny = CURATE_AND_TRAIN.build_config(
        {**tiny_training_sections(TINY_DAG_STEPS), "copy_descriptor": TINY_DESCRIPTOR}
    )
    sources = tuple(replace(s, path=str(data / s.path.rsplit("/", 1)[-1])) for s in preset.ingest.sources)
    fashion, *others = preset.retrieve.sources
    retrieve = replace(
        preset.retrieve, sources=(replace(fashion, num_neighbours=TEST_DEMO_NEIGHBOURS), *others)
    )
    return replace(
        preset,
        store=str(store),
        retrieve=retrieve,
        runtime=replace(preset.runtime, executor="serial", show_progress=False),
        ingest=replace(preset.ingest, sources=sources, **ingest_options),
        **{name: getattr(tiny, name) for name in ("copy_descriptor", "pretrain", "distill", "evaluate")},
    )


def images_row(name: str, source: str, role: str) -> dict:
    """An IMAGES manifest row for a 32x32 PNG that need not exist (stages that never open the file)."""
    return {
        "image_id": f"id-{name}",
        "source": source,
        "role": role,
        "uri": f"/nowhere/{name}.png",
        "container": "file",
        "byte_offset": None,
        "byte_size": 100,
        "width": 32,
        "height": 32,
        "format": "PNG",
        "mode": "RGB",
        "num_frames": 1,
    }


# Under this file-size limit the store's write probe fits, an ingest part does not.
FILE_SIZE_LIMIT = 2048


def limit_file_size() -> None:
    """A subprocess's `preexec_fn`: files over FILE_SIZE_LIMIT bytes cannot be written.

    Why SIGXFSZ ignored: a write past the limit then fails with EFBIG, as a full disk fails with ENOSPC.
    """
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


def bare_stage_context(root: Path, name: str, outputs: dict | None = None) -> StageContext:
    """A serial, quiet StageContext of a stage registered nowhere, storing under `root`: for a test that
    drives stage pieces (partitions, buckets, outputs) without a stage function."""
    spec = StageSpec(
        name=name,
        version=1,
        config_type=dict,
        fn=lambda *_: None,
        inputs={},
        outputs=outputs or {},
        description="",
    )
    return StageContext(spec, "k", Store(root), SerialExecutor(), show_progress=False)
