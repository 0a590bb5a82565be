"""A DAG of registered stages as plain data, checked when built, and a plain-Python runner (no Prefect).

    node("decontaminate", "copy_dedup.images", "copy_dedup.descriptors")
        the stage's inputs, in the order its spec declares them, fed by these upstream outputs; its config
        is the job config's section of the stage's name (or `section=`)
    node("ablate_data", ..., section=("ablate_data", "pretrain", "evaluate"))
        a stage that reads several sections: its config type has one field per section, named after it
    Dag(name, nodes, branches={"ablate_data": (node(...), ...)}, config_name=..., module=...)
        checks: every stage registered, every source an output of an earlier node with the schema the
        input declares, one config type per section; makes the job's root config type from the sections

Input names come from `StageSpec.inputs` only: a node lists where they come from, never what they are
called. A branch runs only when asked for, after the main nodes it reads from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

from pipelines.config import build_config, job_config_type, resolve_config
from pipelines.executor import Executor, build_executor
from pipelines.stage import Manifest, StageRun, StageSpec, get_stage, load_committed, run_stage, stage_key
from pipelines.store import Store
from pipelines.validation import UserInputError

SOURCE_SEPARATOR = "."


class DagError(ValueError):
    """A DAG whose nodes do not fit together (found when it is built, before anything runs)."""


class UpstreamMissingError(RuntimeError):
    """A stage was asked to run alone before the stages it reads from were committed."""


class UnknownStageError(UserInputError):
    """A stage name that is not a node of the DAG."""


@dataclass(frozen=True, slots=True)
class Source:
    """One upstream output: `stage.output`."""

    stage: str
    output: str

    def __str__(self) -> str:
        return f"{self.stage}{SOURCE_SEPARATOR}{self.output}"


@dataclass(frozen=True, slots=True)
class DagNode:
    """A stage in a DAG: where each of its inputs comes from, and the config sections it reads (one,
    or several gathered into its config type's fields of the same names)."""

    stage: str
    sources: tuple[Source, ...]
    sections: tuple[str, ...]

    @property
    def spec(self) -> StageSpec:
        return get_stage(self.stage)

    def inputs(self) -> dict[str, Source]:
        """Input name (the spec's) -> the upstream output that feeds it."""
        return dict(zip(self.spec.inputs, self.sources, strict=True))


def node(stage: str, *sources: str, section: str | tuple[str, ...] | None = None) -> DagNode:
    """A node of `stage` whose inputs, in its spec's order, come from `sources` ("stage.output" each),
    configured by the section `section` (default: the stage's name) or by several sections."""
    parsed = []
    for text in sources:
        upstream, separator, output = text.partition(SOURCE_SEPARATOR)
        if not separator or not upstream or not output:
            raise DagError(f"{stage}: source {text!r} must be 'stage{SOURCE_SEPARATOR}output'")
        parsed.append(Source(upstream, output))
    sections = (section,) if isinstance(section, str) else tuple(section or (stage,))
    return DagNode(stage, tuple(parsed), sections)


class Dag:
    """Nodes in run order, optional branches, and the job config type their sections make.

    Raises:
        DagError: a stage is unknown or repeated, a node's sources do not match its inputs (count,
            upstream node, output name, schema), or two nodes give one section different config types.
    """

    def __init__(
        self,
        name: str,
        nodes: Sequence[DagNode],
        *,
        branches: Mapping[str, Sequence[DagNode]] | None = None,
        config_name: str,
        module: str,
    ) -> None:
        self.name = name
        self.nodes = tuple(nodes)
        self.branches = {branch: tuple(members) for branch, members in (branches or {}).items()}
        _check_nodes(self.nodes, set())
        for members in self.branches.values():
            _check_nodes(members, {item.stage for item in self.nodes})
        _check_unique(self.all_nodes)
        try:
            self.config_type = job_config_type(config_name, _section_types(self.all_nodes), module)
        except ValueError as err:
            raise DagError(f"{name}: {err}") from None

    @property
    def all_nodes(self) -> tuple[DagNode, ...]:
        return self.nodes + tuple(item for members in self.branches.values() for item in members)

    def node(self, stage: str) -> DagNode:
        for item in self.all_nodes:
            if item.stage == stage:
                return item
        names = ", ".join(item.stage for item in self.all_nodes)
        raise UnknownStageError(f"unknown stage {stage!r}; stages: {names}")

    def config_of(self, item: DagNode, cfg: Any) -> Any:
        """The section of the job config `cfg` that configures `item`'s stage, or its several sections
        gathered into the stage's config type."""
        if len(item.sections) == 1:
            return getattr(cfg, item.sections[0])
        return item.spec.config_type(**{section: getattr(cfg, section) for section in item.sections})

    def build_config(self, data: Mapping[str, Any] | None = None) -> Any:
        return build_config(self.config_type, data)

    def resolve_config(
        self, preset: str | None = "demo", config_file: str | Path | None = None, overrides: Any = ()
    ) -> Any:
        """The job config from a preset, a file and overrides (see `pipelines.config.resolve_config`)."""
        return resolve_config(self.config_type, preset, config_file, overrides)

    def nodes_until(self, until: str | None) -> tuple[DagNode, ...]:
        """The main nodes up to and including `until` (all of them for None)."""
        if until is None:
            return self.nodes
        stages = [item.stage for item in self.nodes]
        if until not in stages:
            raise UnknownStageError(f"unknown stage {until!r}; stages: {', '.join(stages)}")
        return self.nodes[: stages.index(until) + 1]

    def branch_upstream(self, branch: str) -> str:
        """The last main node that `branch` reads from: the main nodes up to it must run first."""
        if branch not in self.branches:
            raise UnknownStageError(f"unknown branch {branch!r}; branches: {', '.join(self.branches)}")
        stages = [item.stage for item in self.nodes]
        sources = [source.stage for item in self.branches[branch] for source in item.sources]
        return stages[max(stages.index(stage) for stage in sources if stage in stages)]

    def nodes_to_run(self, until: str | None = None, branches: Iterable[str] = ()) -> tuple[DagNode, ...]:
        """The main nodes up to `until`, then each asked-for branch's nodes, after every main node the
        branch reads from."""
        main = self.nodes_until(until)
        extra: list[DagNode] = []
        for branch in branches:
            main = max(main, self.nodes_until(self.branch_upstream(branch)), key=len)
            extra.extend(self.branches[branch])
        return main + tuple(extra)

    def upstream_nodes(self, stage: str) -> tuple[DagNode, ...]:
        """Every node `stage` reads from, directly or not, in run order."""
        needed = {stage}
        for item in reversed(self.all_nodes):
            if item.stage in needed:
                needed.update(source.stage for source in item.sources)
        needed.discard(stage)
        return tuple(item for item in self.all_nodes if item.stage in needed)


def _check_nodes(nodes: Sequence[DagNode], before: set[str]) -> None:
    seen = set(before)
    outputs = {}
    for item in nodes:
        try:
            spec = item.spec
        except KeyError as err:
            raise DagError(str(err.args[0])) from None
        if len(item.sources) != len(spec.inputs):
            raise DagError(
                f"{item.stage}: takes inputs {list(spec.inputs)} but is given {len(item.sources)} sources"
            )
        for (name, schema), source in zip(spec.inputs.items(), item.sources, strict=True):
            if source.stage not in seen:
                raise DagError(f"{item.stage}.{name}: source {source} is not an earlier node")
            upstream = outputs.get(source.stage) or get_stage(source.stage).outputs
            if source.output not in upstream:
                raise DagError(f"{item.stage}.{name}: {source.stage} has no output {source.output!r}")
            if upstream[source.output] != schema:
                raise DagError(
                    f"{item.stage}.{name} takes {schema.name} v{schema.version}, but {source} is "
                    f"{upstream[source.output].name} v{upstream[source.output].version}"
                )
        seen.add(item.stage)
        outputs[item.stage] = spec.outputs


def _check_unique(nodes: Sequence[DagNode]) -> None:
    stages = [item.stage for item in nodes]
    repeated = sorted({stage for stage in stages if stages.count(stage) > 1})
    if repeated:
        raise DagError(f"stages appear more than once: {repeated}")


def node_section_types(item: DagNode) -> dict[str, type]:
    """Section name -> the config type `item` reads it as.

    Raises:
        DagError: a node of several sections whose config type's fields are not exactly those sections.
    """
    config_type = item.spec.config_type
    if len(item.sections) == 1:
        return {item.sections[0]: config_type}
    fields = get_type_hints(config_type)
    if set(fields) != set(item.sections):
        raise DagError(
            f"{item.stage}: reads sections {list(item.sections)}, but {config_type.__name__} has the "
            f"fields {sorted(fields)}"
        )
    return {section: fields[section] for section in item.sections}


def _section_types(nodes: Sequence[DagNode]) -> dict[str, type]:
    sections: dict[str, type] = {}
    for item in nodes:
        for section, config_type in node_section_types(item).items():
            if sections.setdefault(section, config_type) is not config_type:
                raise DagError(
                    f"section {section!r} configures {sections[section].__name__} and, for "
                    f"{item.stage}, {config_type.__name__}"
                )
    return sections


# -- running -----------------------------------------------------------------------------------------


def stage_inputs(item: DagNode, runs: Mapping[str, StageRun]) -> dict[str, Manifest]:
    return {name: runs[source.stage].outputs[source.output] for name, source in item.inputs().items()}


def run_node(
    dag: Dag, item: DagNode, cfg: Any, runs: Mapping[str, StageRun], store: Store, executor: Executor
) -> StageRun:
    return run_stage(
        item.spec,
        dag.config_of(item, cfg),
        stage_inputs(item, runs),
        store=store,
        executor=executor,
        show_progress=cfg.runtime.show_progress,
    )


def executor_for(cfg: Any) -> Executor:
    runtime = cfg.runtime
    return build_executor(runtime.executor, runtime.num_workers, runtime.ray_address, runtime.gpus_per_worker)


def open_store(cfg: Any) -> Store:
    """The job's store, checked to take files before any stage runs."""
    store = Store(cfg.store)
    store.check_writable()
    return store


def run_pipeline(
    dag: Dag,
    cfg: Any,
    executor: Executor | None = None,
    until: str | None = None,
    branches: Iterable[str] = (),
) -> dict[str, StageRun]:
    """Runs the nodes in order (up to `until`, then the asked-for branches); committed stages are
    reused, so a rerun costs key checks."""
    store = open_store(cfg)
    executor = executor or executor_for(cfg)
    runs: dict[str, StageRun] = {}
    for item in dag.nodes_to_run(until, branches):
        runs[item.stage] = run_node(dag, item, cfg, runs, store, executor)
    return runs


def committed_runs(dag: Dag, nodes: Sequence[DagNode], cfg: Any, store: Store) -> dict[str, StageRun | None]:
    """The committed run of each of `nodes` for this config (None where there is none, and for every
    node that reads from one without); never computes."""
    runs: dict[str, StageRun | None] = {}
    found: dict[str, StageRun] = {}
    for item in nodes:
        if not {source.stage for source in item.sources} <= set(found):
            runs[item.stage] = None
            continue
        spec = item.spec
        key = stage_key(spec, dag.config_of(item, cfg), stage_inputs(item, found))
        run = runs[item.stage] = load_committed(spec, key, store)
        if run is not None:
            found[item.stage] = run
    return runs


def committed_upstream(dag: Dag, stage: str, cfg: Any, store: Store) -> dict[str, StageRun]:
    """The committed runs of every stage that `stage` reads from, for this config; never computes.

    Raises:
        UpstreamMissingError: one of them has no committed run for this config.
    """
    dag.node(stage)  # an unknown name fails here
    runs = committed_runs(dag, dag.upstream_nodes(stage), cfg, store)
    missing = [name for name, run in runs.items() if run is None]
    if missing:
        raise UpstreamMissingError(
            f"stage {stage!r} needs {missing[0]!r}, which has no committed run for this config; "
            f"run `lvd run` (or `lvd stage {missing[0]}`) first"
        )
    return {name: run for name, run in runs.items() if run is not None}


def run_single_stage(dag: Dag, stage: str, cfg: Any, executor: Executor | None = None) -> StageRun:
    store = open_store(cfg)
    upstream = committed_upstream(dag, stage, cfg, store)
    return run_node(dag, dag.node(stage), cfg, upstream, store, executor or executor_for(cfg))
