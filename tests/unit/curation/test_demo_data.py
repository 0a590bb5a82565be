"""The demo scenario: layout, counts, a truthful answer key, byte-reproducible builds, decoder outcomes."""

from __future__ import annotations

import collections
import hashlib
import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.demo import DemoDataConfig, build_demo_data
from curation.demo import ground_truth as gt
from curation.demo.corrupt import BOMB_SIDE, write_corrupt_cases
from curation.demo.sources import list_adwaita_icons, list_openclipart, list_tuxpaint_stamps
from curation.demo.transforms import TRANSFORMS
from pipelines.datasets import MissingSourceError, read_fashion_mnist
from pipelines.images import (
    DEFAULT_BYTES_COLUMN,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    IMAGE_EXTENSIONS,
    DecodeLimits,
    ProbedImage,
    Rejection,
    iter_parquet_images,
    iter_tar_images,
    list_folder_images,
    probe_image,
    read_bytes,
)
from tests.helpers import SMALL_DEMO

LIMITS = DecodeLimits(max_pixels=DEFAULT_MAX_PIXELS, min_side=DEFAULT_MIN_SIDE)
SMALL = SMALL_DEMO
FOLDER_SOURCES = (gt.SEED_FASHION, gt.SEED_TUXPAINT, gt.POOL_ICONS, gt.POOL_JUNK, gt.EVAL_FASHION_TEST)


def _build(root: Path, cfg: DemoDataConfig = SMALL) -> Path:
    # A missing Debian package fails here with the apt-get line to run: `make test` installs them.
    return build_demo_data(root, cfg)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("first") / "demo")


@pytest.fixture(scope="module")
def truth(demo: Path) -> list[dict]:
    return pq.read_table(demo / "ground_truth.parquet").to_pylist()


@pytest.fixture(scope="module")
def contents(demo: Path, truth: list[dict]) -> dict[str, bytes | None]:
    """The bytes behind every ground-truth URI; None where reading raised OSError."""
    web = pq.read_table(demo / "pool_web.parquet").column(DEFAULT_BYTES_COLUMN).to_pylist()
    found: dict[str, bytes | None] = {}
    for row in truth:
        if row["source"] == gt.POOL_WEB:
            found[row["uri"]] = web[int(row["uri"].rpartition("=")[2])]
            continue
        try:
            found[row["uri"]] = read_bytes(row["uri"])
        except OSError:
            found[row["uri"]] = None
    return found


def _count(truth: list[dict], **where: object) -> int:
    return sum(all(row[key] == value for key, value in where.items()) for row in truth)


def test_layout(demo: Path) -> None:
    for name in (*FOLDER_SOURCES, gt.POOL_SHARDS):
        assert (demo / name).is_dir(), name
    for name in ("pool_web.parquet", "ground_truth.parquet", "demo_config.json"):
        assert (demo / name).is_file(), name
    members = SMALL.pool_fashion_count + SMALL.pool_clipart_count
    members += SMALL.pool_near_copy_count + SMALL.eval_near_copy_count
    shards = sorted((demo / gt.POOL_SHARDS).glob("pool-*.tar"))
    assert [shard.name for shard in shards] == [f"pool-{i:06d}.tar" for i in range(len(shards))]
    assert len(shards) == math.ceil(members / SMALL.shard_size)
    web = pq.ParquetFile(demo / "pool_web.parquet")
    assert web.schema_arrow.names == ["key", DEFAULT_BYTES_COLUMN]
    assert web.metadata.num_row_groups == math.ceil(web.metadata.num_rows / SMALL.web_row_group_size)
    assert not demo.with_name(demo.name + ".tmp").exists()


def test_counts_match_config(truth: list[dict]) -> None:
    assert _count(truth, source=gt.SEED_FASHION) == SMALL.seed_fashion_per_class * len(
        SMALL.seed_fashion_classes
    )
    seed_labels = collections.Counter(row["label"] for row in truth if row["source"] == gt.SEED_FASHION)
    assert seed_labels == dict.fromkeys(SMALL.seed_fashion_classes, SMALL.seed_fashion_per_class)
    assert _count(truth, source=gt.SEED_TUXPAINT) == SMALL.seed_tuxpaint_count
    assert _count(truth, source=gt.EVAL_FASHION_TEST) == SMALL.eval_count

    shards = [row for row in truth if row["source"] == gt.POOL_SHARDS]
    fashion = [row for row in shards if row["origin"] == gt.ORIGIN_FASHION_TRAIN]
    assert sum(row["kind"] == gt.KIND_ORIGINAL for row in fashion) == SMALL.pool_fashion_count
    clipart = [row for row in shards if row["origin"] == gt.ORIGIN_OPENCLIPART]
    assert sum(row["kind"] != gt.KIND_NEAR_COPY for row in clipart) == SMALL.pool_clipart_count
    assert _count(truth, source=gt.POOL_SHARDS, kind=gt.KIND_NEAR_COPY) == SMALL.pool_near_copy_count
    assert _count(truth, source=gt.POOL_SHARDS, kind=gt.KIND_EVAL_NEAR_COPY) == SMALL.eval_near_copy_count
    groups = {row["group"] for row in clipart if row["kind"] == gt.KIND_EXACT_COPY}
    assert 1 <= len(groups) <= SMALL.clipart_duplicate_groups

    icons = [row for row in truth if row["source"] == gt.POOL_ICONS]
    assert len({row["label"] for row in icons}) == SMALL.icon_name_count
    assert len(icons) >= 2 * SMALL.icon_name_count  # every name at two sizes or more

    assert _count(truth, source=gt.POOL_WEB) == SMALL.web_fashion_count + SMALL.web_exact_copy_count
    assert _count(truth, source=gt.POOL_WEB, kind=gt.KIND_EXACT_COPY) == SMALL.web_exact_copy_count
    assert {row["source"] for row in truth} == set(gt.SOURCES)
    assert {row["kind"] for row in truth} == set(gt.KINDS)


def test_ground_truth_uris_are_the_ones_ingest_lists(demo: Path, truth: list[dict]) -> None:
    def uris_of(source: str) -> list[str]:
        return [row["uri"] for row in truth if row["source"] == source]

    for source in FOLDER_SOURCES:
        listed, _ = list_folder_images(demo / source, IMAGE_EXTENSIONS)
        assert sorted(listed) == sorted(uris_of(source)), source
    members = [
        item.uri
        for shard in sorted((demo / gt.POOL_SHARDS).glob("*.tar"))
        for item in iter_tar_images(shard, IMAGE_EXTENSIONS)
    ]
    assert members == uris_of(gt.POOL_SHARDS)  # rows are in member order
    web = demo / "pool_web.parquet"
    groups = list(range(pq.ParquetFile(web).metadata.num_row_groups))
    assert [item.uri for item in iter_parquet_images(web, DEFAULT_BYTES_COLUMN, groups)] == uris_of(
        gt.POOL_WEB
    )


def test_every_uri_resolves_to_its_sha256(truth: list[dict], contents: dict[str, bytes | None]) -> None:
    for row in truth:
        data = contents[row["uri"]]
        if data is None:
            assert row["expected_reject"] == "unreadable" and row["sha256"] is None, row
            continue
        assert hashlib.sha256(data).hexdigest() == row["sha256"], row["uri"]


def test_copies_point_at_their_originals(truth: list[dict], contents: dict[str, bytes | None]) -> None:
    copies = [row for row in truth if row["copy_of_uri"] is not None]
    assert {row["kind"] for row in copies} == {gt.KIND_EXACT_COPY, gt.KIND_NEAR_COPY, gt.KIND_EVAL_NEAR_COPY}
    for row in copies:
        original = contents[row["copy_of_uri"]]
        assert original is not None
        assert hashlib.sha256(original).hexdigest() == row["copy_of_sha256"]
        if row["kind"] == gt.KIND_EXACT_COPY:
            assert contents[row["uri"]] == original, row["uri"]
        else:
            assert contents[row["uri"]] != original, row["uri"]
            assert row["transform"] in TRANSFORMS
    eval_uris = {row["uri"] for row in truth if row["source"] == gt.EVAL_FASHION_TEST}
    assert all(row["copy_of_uri"] in eval_uris for row in truth if row["kind"] == gt.KIND_EVAL_NEAR_COPY)


def test_demo_content_gets_its_expected_decoder_outcome(
    truth: list[dict], contents: dict[str, bytes | None]
) -> None:
    for row in truth:
        data = contents[row["uri"]]
        if data is None:
            continue
        outcome = probe_image(data, LIMITS)
        if row["expected_reject"] is None:
            assert isinstance(outcome, ProbedImage), (row["uri"], outcome)
        else:
            assert isinstance(outcome, Rejection) and outcome.reason == row["expected_reject"], row["uri"]


def test_same_seed_gives_the_same_bytes(demo: Path, tmp_path: Path, truth: list[dict]) -> None:
    again = _build(tmp_path / "demo")

    def relative(rows: list[dict], root: Path) -> list[dict]:
        def strip(uri: str | None) -> str | None:
            return None if uri is None else uri.removeprefix(str(root))

        return [{**row, "uri": strip(row["uri"]), "copy_of_uri": strip(row["copy_of_uri"])} for row in rows]

    rebuilt = pq.read_table(again / "ground_truth.parquet").to_pylist()
    assert relative(rebuilt, again) == relative(truth, demo)
    for shard in sorted((demo / gt.POOL_SHARDS).glob("*.tar")):
        assert (again / gt.POOL_SHARDS / shard.name).read_bytes() == shard.read_bytes(), shard.name
    assert (again / "pool_web.parquet").read_bytes() == (demo / "pool_web.parquet").read_bytes()


def test_tar_members_carry_no_host_detail(demo: Path) -> None:
    with tarfile.open(next((demo / gt.POOL_SHARDS).glob("*.tar"))) as tar:
        members = tar.getmembers()
    assert [member.name for member in members] == sorted(member.name for member in members)
    assert all((m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "") for m in members)


def test_rebuild_of_the_same_config_is_free(demo: Path) -> None:
    stamp = (demo / "ground_truth.parquet").stat().st_mtime_ns
    assert build_demo_data(demo, SMALL) == demo
    assert (demo / "ground_truth.parquet").stat().st_mtime_ns == stamp


def test_corrupt_cases_get_exactly_their_expected_outcome(tmp_path: Path) -> None:
    cases = write_corrupt_cases(tmp_path)
    assert len({case.filename for case in cases}) == len(cases)
    for case in cases:
        path = tmp_path / case.filename
        if case.kind == "dangling_symlink":
            with pytest.raises(OSError):
                path.read_bytes()
            continue
        outcome = probe_image(path.read_bytes(), LIMITS)
        if case.expected_reason is None:
            assert isinstance(outcome, ProbedImage), (case, outcome)
            assert (outcome.width, outcome.height) == case.expected_size, case
        else:
            assert isinstance(outcome, Rejection) and outcome.reason == case.expected_reason, (case, outcome)
    kinds = {case.kind: case for case in cases}
    assert BOMB_SIDE * BOMB_SIDE > DEFAULT_MAX_PIXELS
    assert (tmp_path / kinds["decompression_bomb"].filename).stat().st_size < 64 * 1024
    gif = probe_image((tmp_path / kinds["animated_gif"].filename).read_bytes(), LIMITS)
    assert isinstance(gif, ProbedImage) and gif.num_frames > 1


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_transforms_are_deterministic_and_keep_images_usable(name: str, mode: str) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(28, 28, len(mode)), dtype=np.uint8)
    img = Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode=mode)
    original = io.BytesIO()
    img.save(original, format="PNG")
    first = TRANSFORMS[name](img, np.random.default_rng(1))
    second = TRANSFORMS[name](img, np.random.default_rng(1))
    assert first == second
    assert first.data != original.getvalue()
    assert isinstance(probe_image(first.data, LIMITS), ProbedImage)


@pytest.mark.parametrize(
    ("reader", "package"),
    [
        (lambda root: read_fashion_mnist("train", root), "dataset-fashion-mnist"),
        (list_tuxpaint_stamps, "tuxpaint-stamps-default"),
        (list_openclipart, "openclipart-png"),
        (list_adwaita_icons, "adwaita-icon-theme"),
    ],
)
def test_missing_source_names_its_debian_package(reader, package: str, tmp_path: Path) -> None:
    with pytest.raises(MissingSourceError, match=package):
        reader(tmp_path)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"seed": -1}, "seed"),
        ({"shard_size": 0}, "shard_size"),
        ({"seed_fashion_classes": ("Hat",)}, "seed_fashion_classes"),
        ({"eval_near_copy_count": 11, "eval_count": 10}, "eval_near_copy_count"),
        ({"icon_min_size": 8}, "icon_min_size"),
        ({"pool_fashion_count": 60_000}, "pool_fashion_count"),
    ],
)
def test_config_errors_name_the_field(change: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DemoDataConfig(**change)
