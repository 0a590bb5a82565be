"""Union-find components, the keep rule, and the exact_dedup stage."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import curation  # noqa: F401  (registers the stages)
from curation.dedup.components import (
    DUPLICATES_REJECTED,
    NO_MATCH,
    KeepRuleConfig,
    component_stats,
    connected_components,
    duplicate_rejections,
    resolve_groups,
)
from curation.dedup.exact import byte_groups
from curation.ingest import IngestConfig, SourceConfig
from pipelines.manifest import IMAGES, read_manifest, sort_rows
from pipelines.partitions import key_ranges
from pipelines.stage import Manifest, get_stage, run_stage
from pipelines.store import Store
from tests.helpers import images_row, png_bytes


def _reference_components(num_rows: int, edges: list[tuple[int, int]]) -> np.ndarray:
    """Plain breadth-first search: the smallest row index reachable from each row."""
    neighbours: dict[int, set[int]] = {row: set() for row in range(num_rows)}
    for a, b in edges:
        neighbours[a].add(b)
        neighbours[b].add(a)
    labels = np.full(num_rows, -1)
    for start in range(num_rows):
        if labels[start] >= 0:
            continue
        seen, frontier = {start}, [start]
        while frontier:
            frontier = [other for row in frontier for other in neighbours[row] if other not in seen]
            seen.update(frontier)
        labels[list(seen)] = min(seen)
    return labels


@pytest.mark.parametrize("seed", range(5))
def test_union_find_matches_breadth_first_search(seed):
    rng = np.random.default_rng(seed)
    num_rows = 300
    edges = [tuple(pair) for pair in rng.integers(0, num_rows, size=(200, 2))]
    chain = [(row, row + 1) for row in range(250, 299)]  # a long chain needs several hook rounds
    edges += chain[::-1]
    sources, targets = np.array(edges).T
    assert np.array_equal(
        connected_components(num_rows, sources, targets), _reference_components(num_rows, edges)
    )


def test_union_find_without_edges_gives_singletons():
    empty = np.array([], dtype=np.int64)
    assert connected_components(4, empty, empty).tolist() == [0, 1, 2, 3]


def _images(rows: list[tuple[str, str, int]]) -> pa.Table:
    """(uri, role, width) rows, height fixed: enough for the keep rule."""
    return IMAGES.table_from_rows(
        [
            {
                "image_id": f"id-{uri}",
                "source": "s",
                "role": role,
                "uri": uri,
                "container": "file",
                "byte_offset": None,
                "byte_size": 100,
                "width": width,
                "height": 10,
                "format": "PNG",
                "mode": "RGB",
                "num_frames": 1,
            }
            for uri, role, width in rows
        ]
    )


def test_keep_rule_prefers_protected_roles_then_resolution_then_uri():
    images = _images(
        [
            ("a", "uncurated", 50),
            ("b", "uncurated", 80),
            ("c", "uncurated", 80),  # group 0: b wins (size, uri)
            ("d", "uncurated", 500),
            ("e", "curated", 20),
            ("f", "eval", 10),  # group 3: e and f both kept
            ("g", "uncurated", 10),  # alone
        ]
    )
    labels = np.array([0, 0, 0, 3, 3, 3, 6])
    resolution = resolve_groups(images, labels, KeepRuleConfig())
    assert resolution.keep.tolist() == [False, True, False, False, True, True, True]
    # The dropped pool image of group 3 names the best protected row: eval before curated by role priority.
    assert resolution.match.tolist() == [1, NO_MATCH, 1, 5, NO_MATCH, NO_MATCH, NO_MATCH]
    smaller = resolve_groups(images, labels, KeepRuleConfig(prefer_larger=False))
    assert smaller.keep[:3].tolist() == [True, False, False]
    unprotected = resolve_groups(images, labels, KeepRuleConfig(protected_roles=()))
    assert unprotected.keep[3:6].tolist() == [False, False, True]  # exactly one survives: the eval row


def test_component_stats_counts_groups_and_sizes():
    stats = component_stats(np.array([0, 0, 2, 3, 3, 3, 6]))
    assert stats == {
        "groups": 2,
        "rows_in_groups": 5,
        "largest_group": 3,
        "group_sizes": {"<=2": 1, "<=3": 1},
    }


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_exact_dedup_keeps_one_per_byte_group_and_names_it(tmp_path):
    same = png_bytes(1)
    bigger_twin = _png(np.zeros((64, 64, 3), np.uint8))
    (tmp_path / "pool").mkdir()
    (tmp_path / "seeds").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / "pool" / name).write_bytes(same)
    (tmp_path / "pool" / "unique.png").write_bytes(png_bytes(2))
    (tmp_path / "pool" / "twin.png").write_bytes(bigger_twin)
    (tmp_path / "seeds" / "twin.png").write_bytes(bigger_twin)
    sources = (
        SourceConfig(name="pool", role="uncurated", kind="folder", path=str(tmp_path / "pool")),
        SourceConfig(name="seeds", role="curated", kind="folder", path=str(tmp_path / "seeds")),
    )
    store = Store(tmp_path / "store")
    ingest = run_stage(
        get_stage("ingest"), IngestConfig(sources=sources), {}, store=store, show_progress=False
    )
    dedup_spec = get_stage("exact_dedup")
    inputs = {"images": ingest.outputs["images"]}
    run = run_stage(dedup_spec, dedup_spec.config_type(), inputs, store=store, show_progress=False)
    kept = sorted(
        row["uri"].rsplit("/", 2)[-2] + "/" + row["uri"].rsplit("/", 1)[-1]
        for row in read_manifest(run.outputs["images"].uri).to_pylist()
    )
    assert kept == ["pool/a.png", "pool/unique.png", "seeds/twin.png"]
    rejected = read_manifest(run.outputs["rejected"].uri, DUPLICATES_REJECTED).to_pylist()
    by_uri = {row["uri"].rsplit("/", 2)[-2] + "/" + row["uri"].rsplit("/", 1)[-1]: row for row in rejected}
    assert sorted(by_uri) == ["pool/b.png", "pool/c.png", "pool/twin.png"]
    assert by_uri["pool/twin.png"]["match_uri"].endswith("seeds/twin.png")
    assert {row["reason"] for row in rejected} == {"exact_duplicate"} and {
        row["similarity"] for row in rejected
    } == {1.0}
    assert run.record["stats"]["groups"] == 2 and run.record["stats"]["rows_out"] == 3
    assert run.record["artifacts"] == ["duplicate_groups.png"]
    again = run_stage(dedup_spec, dedup_spec.config_type(), inputs, store=store, show_progress=False)
    assert again.reused and again.outputs["images"].digest == run.outputs["images"].digest


SHUFFLE_ROWS = 600
SHUFFLE_IDS = 250
SHUFFLE_ROWS_PER_PART = 64


def test_the_bucketed_stage_gives_the_whole_table_rule_in_key_ranged_parts(tmp_path):
    """Byte groups spread over shuffled parts, several buckets: the kept rows and rejects are the rule's
    on the whole table, and the outputs are key ranges the next stage can walk."""
    rng = np.random.default_rng(8)
    roles = rng.choice(["uncurated", "curated", "eval"], SHUFFLE_ROWS, p=[0.8, 0.1, 0.1])
    ids = rng.integers(0, SHUFFLE_IDS, SHUFFLE_ROWS)
    rows = [
        {
            **images_row(f"r{row}", "s", str(roles[row])),
            "image_id": f"{ids[row]:064x}",
            "byte_size": int(row % 3),
        }
        for row in range(SHUFFLE_ROWS)
    ]
    table = IMAGES.table_from_rows(rows)
    folder = tmp_path / "ingested"
    folder.mkdir()
    for index, part in enumerate(np.array_split(rng.permutation(SHUFFLE_ROWS), 4)):
        pq.write_table(table.take(part), folder / f"part-{index}.parquet")
    store = Store(tmp_path / "store")
    spec = get_stage("exact_dedup")
    cfg = spec.config_type(rows_per_part=SHUFFLE_ROWS_PER_PART)
    inputs = {"images": Manifest(str(folder), "images", "shuffled", SHUFFLE_ROWS)}
    run = run_stage(spec, cfg, inputs, store=store, show_progress=False)

    whole = sort_rows(table)
    labels = byte_groups(whole)
    resolution = resolve_groups(whole, labels, cfg.keep)
    dropped = np.flatnonzero(~resolution.keep)
    expected = duplicate_rejections(
        whole,
        dropped,
        resolution.match[dropped],
        resolution.representative[dropped],
        np.ones(len(dropped), np.float32),
        "exact_duplicate",
    )
    ranges = key_ranges(run.outputs["images"].uri)  # raises unless the parts are key ranges
    assert len(ranges.offsets.parts) > 3
    assert (
        read_manifest(run.outputs["images"].uri, IMAGES)
        .sort_by([("image_id", "ascending"), ("uri", "ascending")])
        .equals(whole.filter(resolution.keep))
    )
    assert sort_rows(read_manifest(run.outputs["rejected"].uri, DUPLICATES_REJECTED)).equals(
        sort_rows(expected)
    )
    stats = run.record["stats"]
    assert (stats["rejected"], stats["groups"]) == (len(dropped), component_stats(labels)["groups"])
    assert stats["group_sizes"] == component_stats(labels)["group_sizes"]
    assert stats["largest_group"] == component_stats(labels)["largest_group"]
    assert not (store.fs.exists(f"{run.uri}/_buckets"))  # the shuffle's pieces are gone once committed
