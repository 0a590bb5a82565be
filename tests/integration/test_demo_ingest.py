"""The demo scenario through curate-and-train's ingest: every file the builder wrote is accounted for."""

from __future__ import annotations

import pytest

from curation.demo import build_demo_data
from curation.demo.ground_truth import GROUND_TRUTH_SCHEMA
from flows.curate_and_train import CURATE_AND_TRAIN
from flows.dag import run_pipeline
from pipelines.manifest import read_manifest
from pipelines.stage import Manifest
from tests.helpers import SMALL_DEMO, demo_job_config


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    data = build_demo_data(root / "demo-data", SMALL_DEMO)
    cfg = demo_job_config(data, root / "store", files_per_shard=16)
    truth = read_manifest(data / "ground_truth.parquet")
    return cfg, run_pipeline(CURATE_AND_TRAIN, cfg), truth


def test_every_written_file_is_an_image_or_a_rejected_row(demo_run):
    _, runs, truth = demo_run
    assert truth.schema.equals(GROUND_TRUTH_SCHEMA, check_metadata=False)
    images = runs["ingest"].outputs["images"].read().to_pylist()
    rejected = runs["ingest"].outputs["rejected"].read().to_pylist()
    truth_by_uri = {row["uri"]: row for row in truth.to_pylist()}
    accepted_uris = [row["uri"] for row in images]
    rejected_uris = [row["uri"] for row in rejected]
    assert sorted(accepted_uris + rejected_uris) == sorted(truth_by_uri), "lost or duplicated rows"
    for row in rejected:
        assert truth_by_uri[row["uri"]]["expected_reject"] == row["reason"], row["uri"]
    for row in images:
        expected = truth_by_uri[row["uri"]]
        assert expected["expected_reject"] is None and expected["sha256"] == row["image_id"], row["uri"]
    roles = {row["source"]: row["role"] for row in images}
    assert roles["seed_fashion"] == "curated" and roles["eval_fashion_test"] == "eval"
    assert roles["pool_web"] == "uncurated"


def test_a_second_run_reuses_every_stage_with_the_same_digests(demo_run):
    cfg, first, _ = demo_run
    second = run_pipeline(CURATE_AND_TRAIN, cfg)
    assert all(run.reused for run in second.values())
    digests = [{n: m.digest for n, m in runs["ingest"].outputs.items()} for runs in (first, second)]
    assert digests[0] == digests[1]
    assert isinstance(second["ingest"].outputs["images"], Manifest)
