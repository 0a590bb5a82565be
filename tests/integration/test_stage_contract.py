"""The stage contract, checked for every stage lvd registers (as timm tests every registered model).

On the small demo's real upstream outputs, each stage is run again in a store of its own:
- a rerun is reused, with the same key and outputs;
- a stage that fans out over shards, with one finished shard deleted, computes that shard alone (every
  other part and shard record is the same file as before) and commits the same digests; a fan-in stage
  writes no shard records (it recomputes as a whole);
- empty inputs (no sources, for ingest) at the stage's default config commit empty outputs that read
  back with their schemas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flows.curate_and_train import CURATE_AND_TRAIN
from flows.dag import run_node, stage_inputs
from pipelines.executor import SerialExecutor
from pipelines.manifest import read_manifest
from pipelines.stage import Manifest, StageRun, registered_stages, run_stage
from pipelines.store import SHARD_RECORDS_DIR, Store, sha256_text
from tests.integration.demo_dag import small_demo_dag

STAGES = [item.stage for item in CURATE_AND_TRAIN.all_nodes]
# The stages that fan out over content-keyed shards and resume shard by shard; the others are fan-in.
SHARDED = {
    "ingest",
    "exact_dedup",
    "phash_dedup",
    "copy_dedup",
    "decontaminate",
    "embed",
    "cluster",
    "retrieve",
    "balance",
}
LVD_PACKAGES = {"curation", "training", "distillation"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Any, dict[str, StageRun], Store, dict[str, StageRun]]:
    """The small demo's config and committed runs, and a store of this module's for the branch stages
    (the data ablation), which the shared runs do not hold."""
    cfg, first = small_demo_dag(tmp_path_factory.getbasetemp())
    return cfg, first, Store(tmp_path_factory.mktemp("contract-upstream")), {}


def upstream_runs(demo, stage: str) -> dict[str, StageRun]:
    """Committed runs of everything `stage` reads from: the shared demo's, else computed here once."""
    cfg, first, store, computed = demo
    runs = {**first, **computed}
    for item in CURATE_AND_TRAIN.upstream_nodes(stage):
        if item.stage not in runs:
            runs[item.stage] = computed[item.stage] = run_node(
                CURATE_AND_TRAIN, item, cfg, runs, store, SerialExecutor()
            )
    return runs


def _run(stage: str, config: Any, inputs: dict[str, Manifest], store: Store) -> StageRun:
    spec = CURATE_AND_TRAIN.node(stage).spec
    return run_stage(spec, config, inputs, store=store, show_progress=False)


def _digests(run: StageRun) -> dict[str, str]:
    return {name: manifest.digest for name, manifest in run.outputs.items()}


def test_every_stage_lvd_registers_is_a_node_of_the_job():
    registered = {
        name for name, spec in registered_stages().items() if spec.fn.__module__.split(".")[0] in LVD_PACKAGES
    }
    assert registered == set(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_a_rerun_is_reused_and_a_deleted_shard_is_recomputed_alone(demo, stage, tmp_path):
    cfg = demo[0]
    item = CURATE_AND_TRAIN.node(stage)
    inputs = stage_inputs(item, upstream_runs(demo, stage))
    config, store = CURATE_AND_TRAIN.config_of(item, cfg), Store(tmp_path / "store")
    first = _run(stage, config, inputs, store)
    again = _run(stage, config, inputs, store)
    assert again.reused and again.key == first.key and _digests(again) == _digests(first)

    stage_dir = Path(first.uri)
    records = sorted((stage_dir / SHARD_RECORDS_DIR).glob("*.json"))
    if stage not in SHARDED:
        assert records == [], f"{stage} is fan-in: it resumes as a whole and keeps no shard records"
        return
    assert len(records) >= 2, f"{stage}: the small demo must give it several shards"
    # A run killed before its last shard and before the commit: that shard's parts, its record and the
    # stage record are missing.
    lost = records[0].stem
    lost_parts = sorted(stage_dir.glob(f"*/part-{lost}.parquet"))
    assert lost_parts, f"{stage}: shard {lost} wrote no part"
    for path in [*lost_parts, records[0], stage_dir / "_STAGE.json"]:
        path.unlink()
    # The kept shards' parts and records (a fan-in step after the shards, e.g. the dedup graph over all
    # hashes, writes its own parts again: those are not shards).
    kept_parts = [part for record in records[1:] for part in stage_dir.glob(f"*/part-{record.stem}.parquet")]
    finished = [*records[1:], *kept_parts]
    written = {path: path.stat().st_mtime_ns for path in finished}

    resumed = _run(stage, config, inputs, store)
    assert not resumed.reused and resumed.key == first.key
    assert _digests(resumed) == _digests(first)
    assert all(path.is_file() for path in lost_parts) and records[0].is_file()
    assert {path: path.stat().st_mtime_ns for path in finished} == written, "finished shards were redone"


def _empty_manifest(folder: Path, schema_name: str) -> Manifest:
    folder.mkdir(parents=True)
    return Manifest(str(folder), schema_name, sha256_text(f"empty {schema_name}"), 0)


@pytest.mark.parametrize("stage", STAGES)
def test_empty_input_commits_empty_outputs_with_their_schemas(stage, tmp_path):
    spec = CURATE_AND_TRAIN.node(stage).spec
    inputs = {name: _empty_manifest(tmp_path / "empty" / name, s.name) for name, s in spec.inputs.items()}
    # At its defaults, as a stage meets no rows (a stage without inputs, ingest, then has no sources).
    config = spec.config_type()
    store = Store(tmp_path / "store")
    run = _run(stage, config, inputs, store)
    for name, schema in spec.outputs.items():
        manifest = run.outputs[name]
        assert (manifest.num_rows, manifest.schema_name) == (0, schema.name), name
        table = read_manifest(manifest.uri, schema)
        assert table.num_rows == 0 and table.schema.names == list(schema.names), name
    again = _run(stage, config, inputs, store)
    assert again.reused and again.key == run.key
