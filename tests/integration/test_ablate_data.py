"""The paper's Table 2 in miniature on the small demo: pretraining on curated vs random vs balanced pool
data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from curation.random_pool import RANDOM_MODE, random_pool_rows, uncurated_pool
from flows.curate_and_train import ABLATE_DATA, CURATE_AND_TRAIN
from flows.dag import run_pipeline
from pipelines.manifest import ROW_KEY_COLUMNS, read_manifest
from pipelines.stage import ARTIFACTS_DIR, get_stage, run_stage
from pipelines.store import Store
from tests.integration.demo_dag import small_demo_dag
from training.ablate import (
    BALANCED_MODEL,
    CURATED_MODEL,
    RANDOM_MODEL,
    REPLICATES_DIR,
    SAMPLE_DIR,
    TABLE_FILE,
)
from training.eval.results import KNN_PROTOCOL, PERCENT
from training.eval.stage import RAW_PIXELS_MODEL
from training.exports import EXPORTS
from training.stages import BACKBONE_FILE, TEACHER_MODEL
from training.trainer import CHECKPOINTS_DIR


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
    again = random_pool_rows(uncurated_pool(images), sample.num_rows, cfg.ablate_data.seed)
    assert row_keys(again) == keys
    other = random_pool_rows(uncurated_pool(images), sample.num_rows, cfg.ablate_data.seed + 1)
    assert set(row_keys(other)) != set(keys)


PRETRAININGS = ("pretrain", "pretrain_random", "pretrain_balanced")
ARM_FOLDERS = (CURATED_MODEL, "random", BALANCED_MODEL)


def replicate_folders(replicates: int) -> list[str]:
    return [f"{arm}-{replicate}" for replicate in range(1, replicates) for arm in ARM_FOLDERS]


def knn_rows(runs, replicate: int | None = 0) -> dict[tuple[str, str], float]:
    """(model, setting) -> k-NN top-1 of one replicate (the raw pixels have none)."""
    results = runs["ablate_data"].outputs["results"].read().to_pylist()
    return {
        (row["model"], row["setting"]): row["top1"]
        for row in results
        if row["protocol"] == KNN_PROTOCOL and row["replicate"] in (replicate, None)
    }


def test_every_teacher_is_evaluated_alike_and_tabulated(ablation):
    cfg, first, runs = ablation
    teachers = {stage: runs[stage].outputs["exports"].read(EXPORTS).to_pylist() for stage in PRETRAININGS}
    assert len({rows[0]["sha256"] for rows in teachers.values()}) == len(PRETRAININGS)
    knn = knn_rows(runs)
    settings = [f"k={k}" for k in cfg.evaluate.knn_ks]
    models = (CURATED_MODEL, RANDOM_MODEL, BALANCED_MODEL, RAW_PIXELS_MODEL)
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


def test_the_balanced_arm_trains_on_balance_s_sample_of_the_curated_size(ablation):
    _, _, runs = ablation
    balanced = runs["balance"].outputs["curated"].read()
    assert balanced.num_rows == runs["assemble"].outputs["curated"].num_rows
    assert set(balanced.column("curation_mode").to_pylist()) == {"balanced"}
    stats = runs["balance"].record["stats"]
    assert stats["top_level_evenness"]["balanced"] > stats["top_level_evenness"]["pool"]


def test_replicates_retrain_every_arm_with_the_next_seeds(ablation):
    cfg, _, runs = ablation
    replicates = cfg.ablate_data.replicates
    assert replicates >= 3
    results = runs["ablate_data"].outputs["results"].read()
    assert sorted(set(results.column("replicate").to_pylist()) - {None}) == list(range(replicates))
    stage_dir = Path(runs["ablate_data"].uri)
    curated = runs["assemble"].outputs["curated"].read()
    images = runs["decontaminate"].outputs["images"].read()
    for replicate in range(1, replicates):
        # The random arm's replicate r trains on the pool sample of seed + r, the curated arm on the
        # curated rows; both with train.seed + r (their checkpoints record it).
        sample = read_manifest(stage_dir / REPLICATES_DIR / f"random-{replicate}" / SAMPLE_DIR)
        expected = random_pool_rows(
            uncurated_pool(images), curated.num_rows, cfg.ablate_data.seed + replicate
        )
        assert row_keys(sample) == row_keys(expected)
        drawn = runs["random_pool"].outputs["replicates"].read()
        drawn = drawn.filter(pc.equal(drawn.column("replicate"), replicate))
        assert row_keys(drawn) == row_keys(expected)
        for arm in ARM_FOLDERS:
            run_config = (
                stage_dir / REPLICATES_DIR / f"{arm}-{replicate}" / "run" / CHECKPOINTS_DIR / "config.json"
            )
            assert json.loads(run_config.read_text())["train"]["seed"] == cfg.pretrain.train.seed + replicate
    # Different seeds, different teachers: 3 x replicates distinct backbones.
    backbones = [
        stage_dir / REPLICATES_DIR / folder / BACKBONE_FILE for folder in replicate_folders(replicates)
    ]
    upstream = [runs[stage].outputs["exports"].read(EXPORTS)["sha256"][0].as_py() for stage in PRETRAININGS]
    digests = {hashlib.sha256(path.read_bytes()).hexdigest() for path in backbones} | set(upstream)
    assert len(digests) == len(ARM_FOLDERS) * replicates


def test_the_summary_is_mean_std_and_paired_difference_of_the_replicates(ablation):
    cfg, _, runs = ablation
    stats = runs["ablate_data"].record["stats"]
    assert stats["replicates"] == cfg.ablate_data.replicates
    table = (Path(runs["ablate_data"].uri) / ARTIFACTS_DIR / TABLE_FILE).read_text()
    for k in cfg.evaluate.knn_ks:
        curated = [knn_rows(runs, r)[(CURATED_MODEL, f"k={k}")] for r in range(stats["replicates"])]
        random = [knn_rows(runs, r)[(RANDOM_MODEL, f"k={k}")] for r in range(stats["replicates"])]
        metric = stats["metrics"][f"k-NN k={k}"]
        assert metric[f"{CURATED_MODEL}_mean"] == pytest.approx(np.mean(curated), abs=1e-12)
        assert metric[f"{RANDOM_MODEL}_std"] == pytest.approx(np.std(random, ddof=1), abs=1e-12)
        differences = np.subtract(curated, random)
        paired = metric[f"{CURATED_MODEL}_minus_random"]
        assert paired["mean"] == pytest.approx(differences.mean(), abs=1e-12)
        assert paired["std"] == pytest.approx(differences.std(ddof=1), abs=1e-12)
        balanced = [knn_rows(runs, r)[(BALANCED_MODEL, f"k={k}")] for r in range(stats["replicates"])]
        balanced_paired = metric[f"{BALANCED_MODEL}_minus_random"]
        assert balanced_paired["mean"] == pytest.approx(np.mean(np.subtract(balanced, random)), abs=1e-12)
        assert metric[RAW_PIXELS_MODEL] == knn_rows(runs, None)[(RAW_PIXELS_MODEL, f"k={k}")]
        (line,) = [line for line in table.splitlines() if line.startswith(f"| k-NN k={k} |")]
        shown = f"{PERCENT * np.mean(curated):.1f} ± {PERCENT * np.std(curated, ddof=1):.1f}"
        assert shown in line and f"{PERCENT * differences.mean():+.1f}" in line, line


def test_a_rerun_reuses_every_replicate(ablation):
    cfg, _, runs = ablation
    upstream = CURATE_AND_TRAIN.branch_upstream(ABLATE_DATA)
    again = run_pipeline(CURATE_AND_TRAIN, cfg, until=upstream, branches=[ABLATE_DATA])
    assert again["ablate_data"].reused and again["ablate_data"].key == runs["ablate_data"].key
