"""The paper's Table 2 in miniature on the small demo: pretraining on curated vs random pool data."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from curation.random_pool import RANDOM_MODE, random_pool_rows
from flows.curate_and_train import ABLATE_DATA, CURATE_AND_TRAIN
from flows.dag import run_pipeline
from pipelines.manifest import ROW_KEY_COLUMNS
from pipelines.stage import ARTIFACTS_DIR, get_stage, run_stage
from pipelines.store import Store
from tests.integration.demo_dag import small_demo_dag
from training.ablate import CURATED_MODEL, RANDOM_MODEL, TABLE_FILE
from training.eval.results import KNN_PROTOCOL, PERCENT
from training.eval.stage import RAW_PIXELS_MODEL
from training.exports import EXPORTS
from training.stages import TEACHER_MODEL


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    cfg, first = small_demo_dag(tmp_path_factory.getbasetemp())
    upstream = CURATE_AND_TRAIN.branch_upstream(ABLATE_DATA)
    return cfg, first, run_pipeline(CURATE_AND_TRAIN, cfg, until=upstream, branches=[ABLATE_DATA])


def row_keys(table: pa.Table) -> list[tuple[str, str]]:
    return list(zip(*(table.column(name).to_pylist() for name in ROW_KEY_COLUMNS), strict=True))


def test_only_the_ablation_is_computed_and_curated_pretraining_is_reused(ablation):
    _, first, runs = ablation
    branch = [node.stage for node in CURATE_AND_TRAIN.branches[ABLATE_DATA]]
    # The main stages up to pretrain, the last one the branch reads, then the branch.
    upstream = [node.stage for node in CURATE_AND_TRAIN.nodes_until("pretrain")]
    assert list(runs) == upstream + branch
    assert all(runs[stage].reused and runs[stage].key == first[stage].key for stage in upstream)
    assert not any(runs[stage].reused for stage in branch)


def test_random_pool_is_a_seeded_sample_of_uncurated_rows_of_the_curated_size(ablation):
    cfg, _, runs = ablation
    sample = runs["random_pool"].outputs["curated"].read()
    images = runs["decontaminate"].outputs["images"].read()
    assert sample.num_rows == runs["assemble"].outputs["curated"].num_rows > 0
    uncurated = {
        key
        for key, role in zip(row_keys(images), images.column("role").to_pylist(), strict=True)
        if role == "uncurated"
    }
    keys = row_keys(sample)
    assert len(set(keys)) == len(keys) and set(keys) <= uncurated  # without replacement, pool rows only
    assert set(sample.column("curation_mode").to_pylist()) == {RANDOM_MODE}
    assert sample.column("query_image_id").null_count == sample.num_rows
    again = random_pool_rows(images, sample.num_rows, cfg.ablate_data.seed)
    assert row_keys(again) == keys
    other = random_pool_rows(images, sample.num_rows, cfg.ablate_data.seed + 1)
    assert set(row_keys(other)) != set(keys)


def test_both_teachers_are_evaluated_alike_and_tabulated(ablation):
    cfg, first, runs = ablation
    teachers = {
        stage: runs[stage].outputs["exports"].read(EXPORTS).to_pylist()
        for stage in ("pretrain", "pretrain_random")
    }
    assert teachers["pretrain"][0]["sha256"] != teachers["pretrain_random"][0]["sha256"]
    results = runs["ablate_data"].outputs["results"].read().to_pylist()
    knn = {(row["model"], row["setting"]): row["top1"] for row in results if row["protocol"] == KNN_PROTOCOL}
    settings = [f"k={k}" for k in cfg.evaluate.knn_ks]
    models = (CURATED_MODEL, RANDOM_MODEL, RAW_PIXELS_MODEL)
    assert set(knn) == {(model, setting) for model in models for setting in settings}
    # Each top-1 is a count of correct test images.
    test_images = runs["ablate_data"].record["stats"]["test_images"]
    assert all(top1 * test_images == pytest.approx(round(top1 * test_images)) for top1 in knn.values())
    # Alike: the curated teacher scores what `evaluate` gave it (it rides along in distill's exports), and
    # the random-data teacher what `evaluate` gives it when run on pretrain_random's exports.
    alone = run_stage(
        get_stage("evaluate"),
        cfg.evaluate,
        {"exports": runs["pretrain_random"].outputs["exports"]},
        store=Store(cfg.store),
        show_progress=False,
    )
    compared = (
        (CURATED_MODEL, first["evaluate"], TEACHER_MODEL),
        (RANDOM_MODEL, alone, TEACHER_MODEL),
        (RAW_PIXELS_MODEL, alone, RAW_PIXELS_MODEL),  # the same baseline in both tables
    )
    for model, evaluation, evaluated_model in compared:
        evaluated = {
            row["setting"]: row["top1"]
            for row in evaluation.outputs["results"].read().to_pylist()
            if row["model"] == evaluated_model and row["protocol"] == KNN_PROTOCOL
        }
        assert evaluated == {setting: knn[(model, setting)] for setting in settings}, model
    table = (Path(runs["ablate_data"].uri) / ARTIFACTS_DIR / TABLE_FILE).read_text()
    for model in models:
        (line,) = [line for line in table.splitlines() if line.startswith(f"| {model} |")]
        percents = [f"{PERCENT * knn[(model, setting)]:.1f}" for setting in settings]
        assert " | ".join(percents) in line, line
