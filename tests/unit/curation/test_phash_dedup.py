"""phash_dedup: an exact search (brute force, imagededup's own pairs), and a stage that keeps its promises."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

import curation  # noqa: F401  (registers the stages)
from curation.dedup import phash
from curation.dedup.components import DUPLICATES_REJECTED, connected_components
from curation.dedup.hamming import (
    HASH_BITS,
    HASH_CLASSES,
    MIN_TABLES,
    SearchPlan,
    binary_codes,
    hamming,
    hash_image,
    hashes_from_hex,
    hashes_to_hex,
    imagededup_hasher,
    multihash_plan,
    near_duplicate_pairs,
    plan_search,
    quiet_imagededup,
)
from curation.dedup.phash import IMAGE_HASHES, PHASH_DEDUP, PhashDedupConfig, dedup_stored_hashes
from curation.demo import build_demo_data
from curation.ingest import IngestConfig
from flows.curate_and_train import CURATE_AND_TRAIN
from pipelines.executor import RayExecutor, SerialExecutor
from pipelines.manifest import IMAGES, align_rows, part_name, read_manifest
from pipelines.stage import Manifest, StageContext, get_stage, run_stage
from pipelines.store import SHARD_RECORDS_DIR, Store
from tests.helpers import SMALL_DEMO

NUM_CENTRES = 150
MEMBERS_PER_CENTRE = 10
MAX_FLIPS = 8  # members of one cluster lie up to 2 * MAX_FLIPS bits apart
RADII = (0, 1, 2, 3, 6, 10)
IMAGEDEDUP_RADII = (0, 2, 4, 10)


def clustered_hashes(seed: int) -> np.ndarray:
    """Cluster centres, each with members a few random bit flips away (pairs at every distance)."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(0, np.iinfo(np.uint64).max, size=NUM_CENTRES, dtype=np.uint64)
    hashes = np.repeat(centres, MEMBERS_PER_CENTRE)
    for row in range(len(hashes)):
        for bit in rng.choice(HASH_BITS, size=rng.integers(0, MAX_FLIPS + 1), replace=False):
            hashes[row] ^= np.uint64(1) << np.uint64(bit)
    return hashes


def brute_force_pairs(hashes: np.ndarray, max_distance: int) -> set[tuple[int, int]]:
    distances = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    sources, targets = np.nonzero(np.triu(distances <= max_distance, k=1))
    return set(zip(sources.tolist(), targets.tolist(), strict=True))


def pair_set(pairs) -> set[tuple[int, int]]:
    return set(zip(pairs.sources.tolist(), pairs.targets.tolist(), strict=True))


def plans_for(num_hashes: int, max_distance: int) -> set[SearchPlan]:
    """Flat, the automatic choice, multi-hash with no bit flips and multi-hash with flips."""
    return {
        SearchPlan("flat"),
        plan_search(num_hashes, max_distance),
        multihash_plan(max_distance, max(MIN_TABLES, max_distance + 1)),
        multihash_plan(max_distance, max(MIN_TABLES, (max_distance + 1) // 2)),
    }


@pytest.mark.parametrize("max_distance", RADII)
def test_a_search_in_index_blocks_finds_every_pair_once(max_distance):
    hashes = clustered_hashes(seed=max_distance + 7)
    expected = brute_force_pairs(hashes, max_distance)
    for plan in plans_for(len(hashes), max_distance):
        found = near_duplicate_pairs(hashes, max_distance, plan, index_rows=len(hashes) // 7)
        assert pair_set(found) == expected and len(found) == len(expected), plan.describe()


@pytest.mark.parametrize("max_distance", RADII)
def test_search_equals_brute_force_for_every_index(max_distance):
    hashes = clustered_hashes(seed=max_distance)
    expected = brute_force_pairs(hashes, max_distance)
    assert expected, "the clusters should give pairs at every radius"
    plans = plans_for(len(hashes), max_distance)
    assert {plan.kind for plan in plans} == {"flat", "multihash"}
    assert any(plan.num_flips for plan in plans) or max_distance < 2
    for plan in plans:
        pairs = near_duplicate_pairs(hashes, max_distance, plan)
        assert pair_set(pairs) == expected, plan.describe()
        assert np.array_equal(pairs.distances, hamming(hashes[pairs.sources], hashes[pairs.targets]))
        assert (np.diff(pairs.sources) >= 0).all(), "pairs come sorted"


def test_pairs_equal_imagededup_find_duplicates():
    hashes = clustered_hashes(seed=1)
    encoding_map = {f"h{row}": text for row, text in enumerate(hashes_to_hex(hashes))}
    quiet_imagededup()
    imagededup = imagededup_hasher("phash")
    for max_distance in IMAGEDEDUP_RADII:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            found = imagededup.find_duplicates(encoding_map=encoding_map, max_distance_threshold=max_distance)
        theirs = {
            tuple(sorted((int(key[1:]), int(other[1:])))) for key, others in found.items() for other in others
        }
        assert pair_set(near_duplicate_pairs(hashes, max_distance)) == theirs, max_distance


def test_hashes_are_imagededups_with_bit_63_first():
    pixels = np.random.default_rng(0).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    for algorithm in HASH_CLASSES:
        text = imagededup_hasher(algorithm).encode_image(image_array=pixels)
        value = hash_image(algorithm, image)
        assert hashes_to_hex(np.array([value], dtype=np.uint64)) == [text]
        first_bit = int(text[0], 16) >> 3
        assert (value >> (HASH_BITS - 1)) == first_bit
    values = hashes_from_hex(["8000000000000001", "00000000000000ff"])
    assert binary_codes(values).tolist() == [[128, 0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 255]]


def _image_rows(specs):
    """IMAGES rows from (role, side) pairs, one image per spec, named img<i>."""
    return IMAGES.table_from_rows(
        [
            {
                "image_id": f"{index:064x}",
                "source": role,
                "role": role,
                "uri": f"/data/img{index}.png",
                "container": "file",
                "byte_offset": None,
                "byte_size": side * side,
                "width": side,
                "height": side,
                "format": "PNG",
                "mode": "RGB",
                "num_frames": 1,
            }
            for index, (role, side) in enumerate(specs)
        ]
    )


def _rejected_by_hash(store: Store, images: pa.Table, hashes: np.ndarray) -> list[dict]:
    """The stage's steps after hashing on `images` (in key order) with these `hashes`: its rejected rows."""
    for name, table in (("images", images), ("hashes", images.select(["image_id", "uri"]))):
        if name == "hashes":
            table = IMAGE_HASHES.validate(table.append_column("hash", pa.array(hashes, pa.uint64())))
        store.write_table_atomic(f"{store.root}/input/{name}/{part_name('0')}", table)
    key = f"k{len(store.fs.ls(store.root))}"
    ctx = StageContext(PHASH_DEDUP, key, store, SerialExecutor(), show_progress=False)
    images_manifest = Manifest(f"{store.root}/input/images", "images", "d", images.num_rows)
    dedup_stored_hashes(PhashDedupConfig(max_distance=2), images_manifest, f"{store.root}/input/hashes", ctx)
    store.fs.rm(f"{store.root}/input", recursive=True)
    return read_manifest(ctx.output_uri("rejected"), DUPLICATES_REJECTED).to_pylist()


def test_a_dropped_row_names_its_nearest_kept_neighbour_else_the_representative(tmp_path):
    store = Store(tmp_path / "store")
    # Chain a ~ b ~ c (2 bits apart each, a and c 4 apart); a is largest and kept.
    images = _image_rows([("uncurated", 64), ("uncurated", 32), ("uncurated", 32)])
    hashes = np.array([0b0, 0b11, 0b1111], dtype=np.uint64)
    rejected = _rejected_by_hash(store, images, hashes)
    assert [(row["uri"], row["match_uri"]) for row in rejected] == [
        ("/data/img1.png", "/data/img0.png"),
        ("/data/img2.png", "/data/img0.png"),  # no kept neighbour within 2 bits: the representative
    ]
    assert [row["similarity"] for row in rejected] == pytest.approx([1 - 2 / 64, 1 - 4 / 64])

    # curated a ~ uncurated b ~ eval c: both references kept, b names the closer one, not the group's.
    images = _image_rows([("curated", 32), ("uncurated", 64), ("eval", 32)])
    hashes = np.array([0b0, 0b1, 0b111], dtype=np.uint64)
    (row,) = _rejected_by_hash(store, images, hashes)
    assert (row["uri"], row["match_uri"], row["group_id"]) == (
        "/data/img1.png",
        "/data/img0.png",
        f"{2:064x}",
    )


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory):
    """The small demo, ingested and exact-deduplicated: the input of phash_dedup."""
    root = tmp_path_factory.mktemp("phash")
    data = build_demo_data(root / "demo-data", SMALL_DEMO)
    preset = CURATE_AND_TRAIN.resolve_config("demo").ingest
    sources = tuple(replace(s, path=str(data / s.path.rsplit("/", 1)[-1])) for s in preset.sources)
    store = Store(root / "store")
    ingest = run_stage(
        get_stage("ingest"), IngestConfig(sources=sources), {}, store=store, show_progress=False
    )
    exact = run_stage(
        get_stage("exact_dedup"),
        CURATE_AND_TRAIN.resolve_config("demo").exact_dedup,
        {"images": ingest.outputs["images"]},
        store=store,
        show_progress=False,
    )
    return exact.outputs["images"]


CONFIG = PhashDedupConfig(rows_per_shard=16)  # several shards on the small demo


def _phash_dedup(images, store, executor=None, cfg=CONFIG):
    return run_stage(
        get_stage("phash_dedup"), cfg, {"images": images}, store=store, executor=executor, show_progress=False
    )


def _digests(run):
    return {name: manifest.digest for name, manifest in run.outputs.items()}


def test_rerun_reuses_and_a_lost_shard_is_the_only_one_rehashed(demo_images, tmp_path, monkeypatch):
    store = Store(tmp_path / "store")
    first = _phash_dedup(demo_images, store)
    assert not first.reused and _phash_dedup(demo_images, store).reused
    # Lose the commit and one hashed shard: the rerun hashes that shard only.
    store.fs.rm_file(store.record_path("phash_dedup", first.key))
    records = sorted(store.fs.glob(f"{store.stage_dir('phash_dedup', first.key)}/{SHARD_RECORDS_DIR}/*.json"))
    store.fs.rm_file(records[0])
    hashed = []
    original = phash.hash_shard
    monkeypatch.setattr(phash, "hash_shard", lambda *args: hashed.append(args) or original(*args))
    again = _phash_dedup(demo_images, store)
    assert not again.reused and len(hashed) == 1
    assert _digests(again) == _digests(first)


def test_serial_and_ray_give_identical_outputs(demo_images, tmp_path, ray_session):
    serial = _phash_dedup(demo_images, Store(tmp_path / "serial"))
    ray = _phash_dedup(demo_images, Store(tmp_path / "ray"), executor=RayExecutor(num_workers=2))
    assert serial.key == ray.key and _digests(serial) == _digests(ray)


def test_the_stage_keeps_references_and_names_kept_neighbours(demo_images, tmp_path):
    run = _phash_dedup(demo_images, Store(tmp_path / "store"))
    images = demo_images.read(IMAGES)
    stored = read_manifest(run.outputs["hashes"].uri, IMAGE_HASHES)
    hashes = np.asarray(stored.column("hash"), dtype=np.uint64)[align_rows(images, stored)]
    kept = read_manifest(run.outputs["images"].uri, IMAGES)
    rejected = read_manifest(run.outputs["rejected"].uri, DUPLICATES_REJECTED).to_pylist()
    assert rejected and kept.num_rows + len(rejected) == images.num_rows
    assert {row["role"] for row in rejected} == {"uncurated"}, "curated and eval rows are never dropped"
    kept_uris = set(kept.column("uri").to_pylist())
    role_of = dict(zip(images.column("uri").to_pylist(), images.column("role").to_pylist(), strict=True))
    assert {uri for uri, role in role_of.items() if role != "uncurated"} <= kept_uris
    assert "eval" in {role_of[row["match_uri"]] for row in rejected}, "pool copies of eval images dropped"

    pairs = near_duplicate_pairs(hashes, CONFIG.max_distance)
    labels = connected_components(images.num_rows, pairs.sources, pairs.targets)
    uris = images.column("uri").to_pylist()
    row_of = {uri: row for row, uri in enumerate(uris)}
    distances = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    for reject in rejected:
        row, match = row_of[reject["uri"]], row_of[reject["match_uri"]]
        assert reject["reason"] == "phash_duplicate" and reject["match_uri"] in kept_uris
        assert labels[row] == labels[match], "the named image is in the same component"
        assert reject["similarity"] == pytest.approx(1 - distances[row, match] / HASH_BITS)
        neighbours = np.flatnonzero((distances[row] <= CONFIG.max_distance) & (labels == labels[row]))
        kept_neighbours = [other for other in neighbours if uris[other] in kept_uris]
        if kept_neighbours:  # else the row hangs on a chain of dropped rows: it names the representative
            assert distances[row, match] == min(distances[row, other] for other in kept_neighbours)

    stats = run.record["stats"]
    assert stats["rows_in"] == images.num_rows and stats["rows_out"] == kept.num_rows
    assert stats["hashing"]["rows"] == images.num_rows and stats["pairs"] == len(pairs)
    assert stats["groups"] >= 1 and sum(stats["group_sizes"].values()) == stats["groups"]
    assert "search_seconds" in stats and run.record["artifacts"] == ["duplicate_groups.png"]


def test_no_images_commit_empty_outputs(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    images = Manifest(uri=str(folder), schema_name=IMAGES.name, digest="empty", num_rows=0)
    run = _phash_dedup(images, Store(tmp_path / "store"), cfg=PhashDedupConfig())
    assert {name: manifest.num_rows for name, manifest in run.outputs.items()} == {
        "images": 0,
        "rejected": 0,
        "hashes": 0,
    }
