"""Thin Prefect flows over the DAG: one task per stage, manifest URIs passed on, no logic of their own.

Idempotence comes from the store keys (a committed stage is reused), not from Prefect's cache, so
Prefect caching and result persistence are off.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE as NO_CACHE

from flows.dag import (
    CURATE_AND_TRAIN,
    NODES,
    DagNode,
    committed_upstream,
    executor_for,
    nodes_to_run,
    run_node,
)
from flows.report import build_report, report_markdown, store_report_path
from flows.summary import stage_markdown
from pipelines.config import PipelineConfig, resolve_config
from pipelines.executor import Executor
from pipelines.stage import StageRun
from pipelines.store import Store

CURATE_AND_TRAIN_FLOW = "curate-and-train"
RUN_STAGE_FLOW = "run-stage"
DEFAULT_DEPLOYMENT = "default"
REPORT_ARTIFACT_KEY = "lvd-report"


@task(task_run_name="{node.stage}", cache_policy=NO_CACHE, persist_result=False)
def stage_task(
    node: DagNode, cfg: PipelineConfig, upstream: dict[str, StageRun], store: Store, executor: Executor
) -> StageRun:
    run = run_node(node, cfg, upstream, store, executor)
    create_markdown_artifact(
        key=f"lvd-{node.stage.replace('_', '-')}",
        markdown=stage_markdown(run),
        description=f"lvd {node.stage}",
    )
    return run


@task(task_run_name="report", cache_policy=NO_CACHE, persist_result=False)
def report_task(cfg: PipelineConfig) -> None:
    """The HTML page in the store folder (local stores); its stage table and accuracies as markdown."""
    path = store_report_path(cfg)
    if path is not None:
        build_report(cfg, path)
    create_markdown_artifact(
        key=REPORT_ARTIFACT_KEY,
        markdown=report_markdown(cfg, path),
        description="lvd curate-and-train report",
    )


def _config(preset: str, config_file: str | None, overrides: list[str] | None) -> PipelineConfig:
    return resolve_config(preset=preset or None, config_file=config_file, overrides=overrides or [])


@flow(name=CURATE_AND_TRAIN_FLOW, persist_result=False, log_prints=True)
def curate_and_train(
    preset: str = "demo",
    config_file: str | None = None,
    overrides: list[str] | None = None,
    until: str | None = None,
    ablate_data: bool = False,
) -> dict[str, StageRun]:
    """Runs every stage of the DAG (or up to `until`), then with `ablate_data` the data ablation, reusing
    committed stages; returns each stage's run."""
    cfg = _config(preset, config_file, overrides)
    store = Store(cfg.store)
    executor = executor_for(cfg)
    runs: dict[str, StageRun] = {}
    for node in nodes_to_run(until, ablate_data):
        runs[node.stage] = stage_task(node, cfg, dict(runs), store, executor)
    report_task(cfg)
    return runs


@flow(name=RUN_STAGE_FLOW, persist_result=False, log_prints=True)
def run_one_stage(
    stage: str, preset: str = "demo", config_file: str | None = None, overrides: list[str] | None = None
) -> StageRun:
    """Reruns one stage against the committed outputs of the stages before it."""
    cfg = _config(preset, config_file, overrides)
    store = Store(cfg.store)
    upstream = committed_upstream(stage, cfg, store)
    return stage_task(NODES[stage], cfg, upstream, store, executor_for(cfg))


def serve_deployments(preset: str, config_file: str | None, overrides: list[str]) -> None:
    """Serves `curate-and-train/default` and `run-stage/<stage>` until interrupted."""
    from prefect import serve

    parameters = {"preset": preset, "config_file": config_file, "overrides": overrides}
    deployments = [curate_and_train.to_deployment(name=DEFAULT_DEPLOYMENT, parameters=parameters)]
    deployments += [
        run_one_stage.to_deployment(name=node.stage, parameters={**parameters, "stage": node.stage})
        for node in CURATE_AND_TRAIN
    ]
    serve(*deployments)
