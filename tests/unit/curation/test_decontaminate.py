"""decontaminate: pool copies of eval images go with their whole component; eval rows always stay."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import curation  # noqa: F401  (registers the stages)
from curation.dedup.components import DUPLICATES_REJECTED
from curation.dedup.copy import CopyDedupConfig
from curation.dedup.decontaminate import DecontaminateConfig
from curation.dedup.descriptors import DESCRIPTORS
from curation.dedup.probe import NEAR_MISSES_OVER, NEAR_MISSES_UNDER
from pipelines.manifest import IMAGES, read_manifest
from pipelines.stage import Manifest, get_stage, run_stage
from pipelines.store import Store
from tests.unit.curation.copy_scenario import (
    TEST_NEIGHBOURS,
    TEST_THRESHOLD,
    descriptor_model,
    ingest_copy_scenario,
)

# Why 0.999: copy_dedup must keep the eval copies here, so that decontaminate is the stage that finds them.
DESCRIBE_ONLY = CopyDedupConfig(threshold=0.999, rows_per_shard=16, score_normalization=False)
CONFIG = DecontaminateConfig(
    num_neighbours=TEST_NEIGHBOURS, threshold=TEST_THRESHOLD, score_normalization=False
)


@pytest.fixture(scope="module")
def decontaminated(tmp_path_factory):
    built, store, images = ingest_copy_scenario(tmp_path_factory.mktemp("decontaminate"))
    model = descriptor_model(store, images)
    described = run_stage(
        get_stage("copy_dedup"), DESCRIBE_ONLY, {"images": images, "model": model}, store=store
    )
    assert described.outputs["rejected"].num_rows == 0
    inputs = {
        "images": described.outputs["images"],
        "descriptors": described.outputs["descriptors"],
        "model": model,
    }
    run = run_stage(get_stage("decontaminate"), CONFIG, inputs, store=store, show_progress=False)
    return built, described, run


def test_eval_copies_go_with_their_whole_component(decontaminated):
    built, described, run = decontaminated
    rejected = {
        row["uri"]: row for row in read_manifest(run.outputs["rejected"].uri, DUPLICATES_REJECTED).to_pylist()
    }
    eval_copies = {copy: original for copy, original in built.copy_of.items() if "evalcopy" in copy}
    assert set(rejected) == set(eval_copies)
    chained = next(uri for uri in eval_copies if uri.endswith("_shrink.png"))
    # The shrink of a JPEG copy joins through that copy; it names the eval image, not the copy.
    assert rejected[chained]["match_uri"] == built.eval_uris[0]
    assert rejected[eval_copies[chained]]["match_uri"] == built.eval_uris[0]
    crop = next(uri for uri in eval_copies if uri.endswith("_crop.png"))
    assert rejected[crop]["match_uri"] == built.eval_uris[1]
    images = described.outputs["images"].read(IMAGES).to_pylist()
    id_of = {row["uri"]: row["image_id"] for row in images}
    vectors = {
        row["uri"]: np.asarray(row["descriptor"], np.float32)
        for row in described.outputs["descriptors"].read(DESCRIPTORS).to_pylist()
    }
    for uri, row in rejected.items():
        assert row["reason"] == "eval_contamination" and row["role"] == "uncurated"
        assert row["group_id"] == id_of[row["match_uri"]] and row["match_uri"] in built.eval_uris
        assert row["similarity"] == pytest.approx(vectors[uri] @ vectors[row["match_uri"]], abs=2e-3)
        assert row["match_uri"] in row["detail"]


def test_eval_and_curated_rows_stay_and_counts_add_up(decontaminated):
    built, described, run = decontaminated
    kept = read_manifest(run.outputs["images"].uri, IMAGES)
    kept_uris = set(kept.column("uri").to_pylist())
    assert set(built.eval_uris) <= kept_uris and built.seed_uri in kept_uris
    stats = run.record["stats"]
    assert stats["rows_in"] == described.outputs["images"].num_rows == kept.num_rows + stats["rejected"]
    assert stats["eval_rows"] == len(built.eval_uris) and stats["eval_images_matched"] == 2
    assert stats["contaminated_components"] == 2
    assert set(run.record["artifacts"]) == {"decontaminated.png", NEAR_MISSES_OVER, NEAR_MISSES_UNDER}


def test_descriptors_of_rows_not_in_images_are_ignored(decontaminated, tmp_path):
    built, described, _ = decontaminated
    crop = next(uri for uri in built.copy_of if uri.endswith("evalcopy_1_crop.png"))
    images = described.outputs["images"].read(IMAGES)
    subset = images.filter(pc.not_equal(images.column("uri"), crop))
    folder = tmp_path / "subset"
    folder.mkdir()
    pq.write_table(subset, folder / "part-all.parquet")
    manifest = Manifest(uri=str(folder), schema_name=IMAGES.name, digest="subset", num_rows=subset.num_rows)
    model = descriptor_model(Store(tmp_path / "store"), manifest)
    inputs = {"images": manifest, "descriptors": described.outputs["descriptors"], "model": model}
    run = run_stage(get_stage("decontaminate"), CONFIG, inputs, store=Store(tmp_path / "store"))
    rejected = read_manifest(run.outputs["rejected"].uri, DUPLICATES_REJECTED)
    assert crop not in rejected.column("uri").to_pylist() and rejected.num_rows == 2
    assert run.outputs["images"].num_rows + rejected.num_rows == subset.num_rows


def test_eval_rows_can_never_be_dropped():
    with pytest.raises(ValueError, match="drop_roles"):
        DecontaminateConfig(drop_roles=("uncurated", "eval"))
