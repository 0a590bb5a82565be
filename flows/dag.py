"""The curate-and-train DAG as plain data, and a plain-Python runner for it (no Prefect here).

    ingest -> exact_dedup -> phash_dedup -> copy_dedup -> decontaminate -> embed -> cluster
      -> retrieve -> assemble -> pretrain -> distill -> evaluate

and, only when asked, the data ablation (the paper's Table 2 in miniature):

    decontaminate + assemble -> random_pool -> pretrain_random -> ablate_data <- pretrain

Each node names its stage, the section of PipelineConfig that configures it, and which upstream
outputs feed which of its inputs. The Prefect flows walk the same nodes, one task per node.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import curation  # noqa: F401  (registers the curation stages, random_pool included)
import distillation  # noqa: F401  (registers the distill stage)
import training  # noqa: F401  (registers pretrain, evaluate and the ablation stages)
from pipelines.config import PipelineConfig
from pipelines.executor import Executor, build_executor
from pipelines.stage import Manifest, StageRun, get_stage, load_committed, run_stage, stage_key
from pipelines.store import Store


@dataclass(frozen=True, slots=True)
class DagNode:
    stage: str
    config: Callable[[PipelineConfig], Any]
    inputs: Mapping[str, tuple[str, str]]  # input name -> (upstream stage, upstream output)


CURATE_AND_TRAIN: tuple[DagNode, ...] = (
    DagNode("ingest", lambda cfg: cfg.ingest, {}),
    DagNode("exact_dedup", lambda cfg: cfg.exact_dedup, {"images": ("ingest", "images")}),
    DagNode("phash_dedup", lambda cfg: cfg.phash_dedup, {"images": ("exact_dedup", "images")}),
    DagNode("copy_dedup", lambda cfg: cfg.copy_dedup, {"images": ("phash_dedup", "images")}),
    DagNode(
        "decontaminate",
        lambda cfg: cfg.decontaminate,
        {"images": ("copy_dedup", "images"), "descriptors": ("copy_dedup", "descriptors")},
    ),
    DagNode("embed", lambda cfg: cfg.embed, {"images": ("decontaminate", "images")}),
    DagNode("cluster", lambda cfg: cfg.cluster, {"embeddings": ("embed", "embeddings")}),
    DagNode(
        "retrieve",
        lambda cfg: cfg.retrieve,
        {
            "embeddings": ("embed", "embeddings"),
            "assignments": ("cluster", "assignments"),
            "centroids": ("cluster", "centroids"),
        },
    ),
    DagNode(
        "assemble",
        lambda cfg: cfg.assemble,
        {
            "images": ("decontaminate", "images"),
            "retrieved": ("retrieve", "retrieved"),
            "retrieval_summary": ("retrieve", "summary"),
        },
    ),
    DagNode("pretrain", lambda cfg: cfg.pretrain, {"curated": ("assemble", "curated")}),
    DagNode(
        "distill",
        lambda cfg: cfg.distill,
        {"curated": ("assemble", "curated"), "exports": ("pretrain", "exports")},
    ),
    DagNode("evaluate", lambda cfg: cfg.evaluate, {"exports": ("distill", "exports")}),
)
NODES = {node.stage: node for node in CURATE_AND_TRAIN}

# The data ablation reads curate-and-train's outputs up to this node.
ABLATE_DATA_UPSTREAM = "pretrain"
ABLATE_DATA: tuple[DagNode, ...] = (
    DagNode(
        "random_pool",
        lambda cfg: cfg.ablate_data,
        {"images": ("decontaminate", "images"), "curated": ("assemble", "curated")},
    ),
    # The same config section as `pretrain`: only the data differs.
    DagNode("pretrain_random", lambda cfg: cfg.pretrain, {"curated": ("random_pool", "curated")}),
    DagNode(
        "ablate_data",
        lambda cfg: cfg.evaluate,
        {"curated_exports": ("pretrain", "exports"), "random_exports": ("pretrain_random", "exports")},
    ),
)


class UpstreamMissingError(RuntimeError):
    """A stage was asked to run alone before the stages it reads from were committed."""


class UnknownStageError(ValueError):
    """A stage name that is not a node of the DAG."""


def _check_stage_name(stage: str) -> None:
    if stage not in NODES:
        raise UnknownStageError(f"unknown stage {stage!r}; stages: {', '.join(NODES)}")


def stage_inputs(node: DagNode, runs: Mapping[str, StageRun]) -> dict[str, Manifest]:
    return {name: runs[stage].outputs[output] for name, (stage, output) in node.inputs.items()}


def run_node(
    node: DagNode, cfg: PipelineConfig, runs: Mapping[str, StageRun], store: Store, executor: Executor
) -> StageRun:
    return run_stage(
        get_stage(node.stage),
        node.config(cfg),
        stage_inputs(node, runs),
        store=store,
        executor=executor,
        show_progress=cfg.runtime.show_progress,
    )


def executor_for(cfg: PipelineConfig) -> Executor:
    runtime = cfg.runtime
    return build_executor(runtime.executor, runtime.num_workers, runtime.ray_address, runtime.gpus_per_worker)


def nodes_until(until: str | None) -> tuple[DagNode, ...]:
    """The DAG's nodes up to and including `until` (all of them for None)."""
    if until is None:
        return CURATE_AND_TRAIN
    _check_stage_name(until)
    stages = [node.stage for node in CURATE_AND_TRAIN]
    return CURATE_AND_TRAIN[: stages.index(until) + 1]


def nodes_to_run(until: str | None = None, ablate_data: bool = False) -> tuple[DagNode, ...]:
    """The DAG's nodes up to `until`; with `ablate_data`, then the ablation's nodes (after at least
    ABLATE_DATA_UPSTREAM, which they read from)."""
    nodes = nodes_until(until)
    if not ablate_data:
        return nodes
    upstream = nodes_until(ABLATE_DATA_UPSTREAM)
    return (nodes if len(nodes) > len(upstream) else upstream) + ABLATE_DATA


def run_pipeline(
    cfg: PipelineConfig,
    executor: Executor | None = None,
    until: str | None = None,
    ablate_data: bool = False,
) -> dict[str, StageRun]:
    """Runs the nodes in order (up to `until`, then the ablation's with `ablate_data`); committed stages
    are reused, so a rerun costs key checks."""
    store = Store(cfg.store)
    executor = executor or executor_for(cfg)
    runs: dict[str, StageRun] = {}
    for node in nodes_to_run(until, ablate_data):
        runs[node.stage] = run_node(node, cfg, runs, store, executor)
    return runs


def committed_upstream(stage: str, cfg: PipelineConfig, store: Store) -> dict[str, StageRun]:
    """The committed runs of every stage that `stage` reads from, for this config; never computes."""
    _check_stage_name(stage)
    runs: dict[str, StageRun] = {}
    for node in CURATE_AND_TRAIN:
        if node.stage == stage:
            return runs
        spec = get_stage(node.stage)
        key = stage_key(spec, node.config(cfg), stage_inputs(node, runs))
        committed = load_committed(spec, key, store)
        if committed is None:
            raise UpstreamMissingError(
                f"stage {stage!r} needs {node.stage!r}, which has no committed run for this config; "
                f"run `lvd run` (or `lvd stage {node.stage}`) first"
            )
        runs[node.stage] = committed
    raise AssertionError(f"{stage} is in NODES but not in CURATE_AND_TRAIN")


def run_single_stage(stage: str, cfg: PipelineConfig, executor: Executor | None = None) -> StageRun:
    store = Store(cfg.store)
    upstream = committed_upstream(stage, cfg, store)
    return run_node(NODES[stage], cfg, upstream, store, executor or executor_for(cfg))
