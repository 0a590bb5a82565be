"""Thin Prefect flows over the DAG: one task per stage, manifest URIs passed on, no logic of their own.

Idempotence comes from the store keys (a committed stage is reused), not from Prefect's cache, so
Prefect caching and result persistence are off.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE as NO_CACHE

from flows.curate_and_train import ABLATE_DATA, CURATE_AND_TRAIN
from flows.dag import DagNode, committed_upstream, executor_for, open_store, run_node
from flows.report import build_report, report_markdown, store_report_path
from flows.summary import stage_markdown
from pipelines.executor import Executor
from pipelines.stage import StageRun
from pipelines.store import Store

CURATE_AND_TRAIN_FLOW = "curate-and-train"
RUN_STAGE_FLOW = "run-stage"
DEFAULT_DEPLOYMENT = "default"
REPORT_ARTIFACT_KEY = "lvd-report"


@task(task_run_name="{item.stage}", cache_policy=NO_CACHE, persist_result=False)
def stage_task(
    item: DagNode, cfg: Any, upstream: dict[str, StageRun], store: Store, executor: Executor
) -> StageRun:
    run = run_node(CURATE_AND_TRAIN, item, cfg, upstream, store, executor)
    create_markdown_artifact(
        key=f"lvd-{item.stage.replace('_', '-')}",
        markdown=stage_markdown(run),
        description=f"lvd {item.stage}",
    )
    return run


@task(task_run_name="report", cache_policy=NO_CACHE, persist_result=False)
def report_task(cfg: Any) -> None:
    """The HTML page in the store folder (local stores); its stage table and tables as markdown."""
    path = store_report_path(cfg)
    if path is not None:
        build_report(cfg, path)
    create_markdown_artifact(
        key=REPORT_ARTIFACT_KEY,
        markdown=report_markdown(cfg, path),
        description="lvd curate-and-train report",
    )


def _config(preset: str, config_file: str | None, overrides: list[str] | None, config: Any) -> Any:
    if config is not None:
        return config
    return CURATE_AND_TRAIN.resolve_config(preset or None, config_file, overrides or [])


@flow(name=CURATE_AND_TRAIN_FLOW, persist_result=False, log_prints=True)
def curate_and_train(
    preset: str = "demo",
    config_file: str | None = None,
    overrides: list[str] | None = None,
    until: str | None = None,
    ablate_data: bool = False,
    config: Any = None,
) -> dict[str, StageRun]:
    """Runs every stage of the DAG (or up to `until`), then with `ablate_data` the data ablation, reusing
    committed stages; returns each stage's run.

    The job config is `config` when given (`lvd run` passes the one it resolved and checked), else the
    preset, file and overrides (a deployment's parameters) resolved here.
    """
    cfg = _config(preset, config_file, overrides, config)
    store = open_store(cfg)
    executor = executor_for(cfg)
    runs: dict[str, StageRun] = {}
    branches = (ABLATE_DATA,) if ablate_data else ()
    for item in CURATE_AND_TRAIN.nodes_to_run(until, branches):
        runs[item.stage] = stage_task(item, cfg, dict(runs), store, executor)
    report_task(cfg)
    return runs


@flow(name=RUN_STAGE_FLOW, persist_result=False, log_prints=True)
def run_one_stage(
    stage: str,
    preset: str = "demo",
    config_file: str | None = None,
    overrides: list[str] | None = None,
    config: Any = None,
) -> StageRun:
    """Reruns one stage against the committed outputs of the stages it reads from."""
    cfg = _config(preset, config_file, overrides, config)
    store = open_store(cfg)
    upstream = committed_upstream(CURATE_AND_TRAIN, stage, cfg, store)
    return stage_task(CURATE_AND_TRAIN.node(stage), cfg, upstream, store, executor_for(cfg))


def serve_deployments(preset: str, config_file: str | None, overrides: list[str]) -> None:
    """Serves `curate-and-train/default` and `run-stage/<stage>` until interrupted."""
    from prefect import serve

    parameters = {"preset": preset, "config_file": config_file, "overrides": overrides}
    deployments = [curate_and_train.to_deployment(name=DEFAULT_DEPLOYMENT, parameters=parameters)]
    deployments += [
        run_one_stage.to_deployment(name=item.stage, parameters={**parameters, "stage": item.stage})
        for item in CURATE_AND_TRAIN.nodes
    ]
    serve(*deployments)
