"""The assemble stage: provenance per row, the composition table, the seeds-as-is switch."""

from __future__ import annotations

import pytest

import curation  # noqa: F401  (registers the stages)
from curation.assemble import AssembleConfig
from curation.hits import RETRIEVED
from curation.retrieve import COMPOSITION
from pipelines.manifest import IMAGES, ManifestError
from pipelines.stage import get_stage, run_stage
from pipelines.store import Store
from tests.helpers import images_row
from tests.unit.curation.embedding_data import write_manifest


def _hit(pool: str, seed_source: str, mode: str, query: str | None, rank: int, cluster: int) -> dict:
    return {
        "image_id": f"id-{pool}",
        "uri": f"/nowhere/{pool}.png",
        "source": "web",
        "seed_source": seed_source,
        "mode": mode,
        "query_image_id": f"id-{query}" if query else None,
        "query_uri": f"/nowhere/{query}.png" if query else None,
        "similarity": 0.9 - 0.1 * rank,
        "rank": rank,
        "cluster": cluster,
    }


IMAGE_ROWS = [
    images_row("s1", "inet", "curated"),
    images_row("s2", "inet", "curated"),
    images_row("f1", "flowers", "curated"),
    *(images_row(f"w{row}", "web", "uncurated") for row in range(6)),
]
# inet: two queries, two neighbours each, w1 retrieved twice (multiplicity); flowers: cluster mode, capped.
HITS = [
    _hit("w0", "inet", "sample", "s1", 0, 1),
    _hit("w1", "inet", "sample", "s1", 1, 1),
    _hit("w1", "inet", "sample", "s2", 0, 1),
    _hit("w2", "inet", "sample", "s2", 1, 2),
    _hit("w3", "flowers", "cluster", None, 0, 3),
    _hit("w4", "flowers", "cluster", None, 1, 3),
]
SUMMARY = [
    {"seed_source": "inet", "mode": "sample", "seed_images": 2, "retrieved": 4, "final": 4},
    {"seed_source": "flowers", "mode": "cluster", "seed_images": 1, "retrieved": 5, "final": 2},
]


def _assemble(tmp_path, cfg: AssembleConfig, hits=HITS, store_name="store"):
    root = tmp_path / store_name
    inputs = {
        "images": write_manifest(root, "images", IMAGES, IMAGES.table_from_rows(IMAGE_ROWS)),
        "retrieved": write_manifest(root, "retrieved", RETRIEVED, RETRIEVED.table_from_rows(hits)),
        "retrieval_summary": write_manifest(
            root, "summary", COMPOSITION, COMPOSITION.table_from_rows(SUMMARY)
        ),
    }
    return run_stage(get_stage("assemble"), cfg, inputs, store=Store(root / "store"), show_progress=False)


def test_curated_rows_carry_provenance_and_composition_counts(tmp_path):
    run = _assemble(tmp_path, AssembleConfig())
    curated = run.outputs["curated"].read()
    assert curated.num_rows == 3 + len(HITS)
    rows = {
        (row["image_id"], row["curation_mode"], row["query_image_id"]): row for row in curated.to_pylist()
    }
    seed = rows[("id-s1", "as_is", None)]
    assert seed["seed_source"] == "inet" and seed["similarity"] is None and seed["cluster"] is None
    hit = rows[("id-w1", "sample", "id-s2")]
    assert (hit["seed_source"], hit["rank"], hit["cluster"], hit["width"]) == ("inet", 0, 1, 32)
    assert hit["similarity"] == pytest.approx(0.9)
    assert rows[("id-w3", "cluster", None)]["source"] == "web"
    composition = {
        (row["seed_source"], row["mode"]): row for row in run.outputs["composition"].read().to_pylist()
    }
    assert composition[("inet", "as_is")] == {
        "seed_source": "inet",
        "mode": "as_is",
        "seed_images": 2,
        "retrieved": None,
        "final": 2,
    }
    assert composition[("flowers", "as_is")]["final"] == 1
    assert (composition[("inet", "sample")]["retrieved"], composition[("inet", "sample")]["final"]) == (4, 4)
    assert (
        composition[("flowers", "cluster")]["retrieved"],
        composition[("flowers", "cluster")]["final"],
    ) == (5, 2)
    stats = run.record["stats"]
    assert stats["rows"] == 9 and stats["unique_images"] == 8  # w1 twice: multiplicity
    assert stats["rows_by_mode"] == {"as_is": 3, "sample": 4, "cluster": 2}


def test_seeds_as_is_can_be_off_or_limited_to_named_sources(tmp_path):
    off = _assemble(tmp_path, AssembleConfig(include_seeds=False), store_name="off")
    assert set(off.outputs["curated"].read().column("curation_mode").to_pylist()) == {"sample", "cluster"}
    assert {row["mode"] for row in off.outputs["composition"].read().to_pylist()} == {"sample", "cluster"}
    named = _assemble(tmp_path, AssembleConfig(as_is_sources=("flowers",)), store_name="named")
    curated = named.outputs["curated"].read().to_pylist()
    assert sorted(row["image_id"] for row in curated if row["curation_mode"] == "as_is") == ["id-f1"]


def test_a_pool_image_dropped_upstream_cannot_come_back(tmp_path):
    ghost = _hit("gone", "inet", "sample", "s1", 0, 1)  # e.g. removed by decontamination
    with pytest.raises(ManifestError, match="missing from the images manifest"):
        _assemble(tmp_path, AssembleConfig(), hits=[*HITS, ghost])
