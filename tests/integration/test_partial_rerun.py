"""Changing one retrieval parameter recomputes `retrieve` and what follows it, and reuses the rest."""

from __future__ import annotations

from dataclasses import replace

import pyarrow.compute as pc
import pytest

from flows.curate_and_train import CURATE_AND_TRAIN
from flows.dag import run_pipeline
from pipelines.config import apply_overrides, config_as_dict
from pipelines.stage import StageRun
from tests.integration.demo_dag import small_demo_dag

CHANGED_STAGE = "retrieve"
CHANGED_KEY = "retrieve.sources.0.num_neighbours"
SAMPLE_MODE = "sample"


@pytest.fixture(scope="module")
def demo_dag(tmp_path_factory):
    return small_demo_dag(tmp_path_factory.getbasetemp())


def sample_rows(run: StageRun, source: str) -> int:
    """Rows a sample-mode seed source retrieved."""
    retrieved = run.outputs["retrieved"].read()
    mine = pc.and_(
        pc.equal(retrieved.column("seed_source"), source), pc.equal(retrieved.column("mode"), SAMPLE_MODE)
    )
    return pc.sum(mine).as_py()


def test_changing_one_retrieval_parameter_recomputes_only_retrieve_and_what_follows(demo_dag):
    cfg, first = demo_dag
    source = cfg.retrieve.sources[0]
    assert source.mode == SAMPLE_MODE
    fewer = source.num_neighbours // 2
    # Through the same override path as `--set`; nothing else may differ.
    changed = CURATE_AND_TRAIN.build_config(apply_overrides(config_as_dict(cfg), {CHANGED_KEY: fewer}))
    assert changed.retrieve.sources[0].num_neighbours == fewer
    assert replace(changed, retrieve=cfg.retrieve) == cfg
    assert changed.retrieve.sources[1:] == cfg.retrieve.sources[1:]

    second = run_pipeline(CURATE_AND_TRAIN, changed)

    stages = [node.stage for node in CURATE_AND_TRAIN.nodes]
    split = stages.index(CHANGED_STAGE)
    assert list(second) == stages
    assert [stage for stage in stages if second[stage].reused] == stages[:split]
    for stage in stages[:split]:
        assert second[stage].key == first[stage].key, stage
    for stage in stages[split:]:
        assert second[stage].key != first[stage].key, stage
    # What changed is what was asked: N nearest pool images per seed query, with multiplicity.
    images = first["decontaminate"].outputs["images"].read()
    queries = pc.sum(pc.equal(images.column("source"), source.source)).as_py()
    assert sample_rows(first[CHANGED_STAGE], source.source) == queries * source.num_neighbours
    assert sample_rows(second[CHANGED_STAGE], source.source) == queries * fewer


def test_the_copy_descriptor_is_reused_on_a_rerun_and_retrained_only_with_what_depends_on_it(demo_dag):
    cfg, first = demo_dag
    again = run_pipeline(CURATE_AND_TRAIN, cfg)
    assert all(run.reused for run in again.values())
    assert again["copy_descriptor"].key == first["copy_descriptor"].key

    steps = cfg.copy_descriptor.train.steps + 1
    changed = CURATE_AND_TRAIN.build_config(
        apply_overrides(config_as_dict(cfg), {"copy_descriptor.train.steps": steps})
    )
    second = run_pipeline(CURATE_AND_TRAIN, changed)
    stages = [node.stage for node in CURATE_AND_TRAIN.nodes]
    split = stages.index("copy_descriptor")
    assert all(second[stage].reused for stage in stages[:split])
    # The two stages that load the model recompute; later ones only if the rows they get changed.
    assert not any(second[stage].reused for stage in ("copy_descriptor", "copy_dedup", "decontaminate"))
    for stage in stages[stages.index("decontaminate") + 1 :]:
        same_inputs = _input_digests(second[stage]) == _input_digests(first[stage])
        assert second[stage].reused == same_inputs, stage
    assert second["copy_descriptor"].record["stats"]["steps"] == steps
    model = second["copy_descriptor"].outputs["model"].read().to_pylist()
    assert model[0]["sha256"] != first["copy_descriptor"].outputs["model"].read().to_pylist()[0]["sha256"]


def _input_digests(run: StageRun) -> dict[str, str]:
    return {name: manifest.digest for name, manifest in run.inputs.items()}
