"""The paper's Table 2 in miniature: the same pretraining on curated, on random pool and on balanced
pool data (DINOv3's hierarchical k-means sampling), compared over several seeds.

    random_pool's curated-shaped sample --pretrain_random (pretrain's function, same `pretrain` section)-->
      exports (its teacher): replicate 0 of the random arm; pretrain's teacher is replicate 0 of the
      curated arm, pretrain_balanced's (on balance's sample of the same size) of the balanced arm
    ablate_data, replicates r = 1 .. R-1 (sections ablate_data, pretrain, evaluate):
      curated rows, balanced rows            --train_teacher, train.seed + r--> curated, balanced teacher r
      random_pool's `replicates` rows of r (its sample of seed + r) --train_teacher, train.seed + r-->
        random teacher r
    every teacher and the raw pixels --evaluate_backbone with the `evaluate` section-->
      `results` manifest (ABLATION_RESULTS: eval rows + replicate), artifacts/table2.md:
      per arm mean and std over replicates; the paired difference of curated and of balanced against
      random, each with its 95% interval

Stage names of their own for the random- and balanced-data pretrainings keep their runs apart from the
curated one's in the store and in every summary, while the function and its config stay exactly those
of `pretrain`. The replicates train inside ablate_data (each resumable from its own folder) because their
number is a setting of the ablation, not of the job's DAG.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.manifest import CURATED, CURATED_REPLICATES, ManifestSchema, part_name
from pipelines.stage import Manifest, StageContext, StageRun, StageSpec, register_stage
from pipelines.validation import require
from pipelines.views import TableView, table_view
from training.config import PretrainConfig
from training.eval.config import EvaluateConfig
from training.eval.replicates import PairedDifference, Spread, paired_difference, spread
from training.eval.results import EVAL_RESULTS, KNN_PROTOCOL, PERCENT, ModelResult, result_rows
from training.eval.stage import EvalData, evaluate_backbone, evaluate_raw_pixels, load_eval_data
from training.exports import EXPORTS, read_exports
from training.stages import BACKBONE_FILE, PRETRAIN, RUN_DIR, TEACHER_MODEL, train_teacher

TABLE_FILE = "table2.md"
CURATED_MODEL = "curated"
RANDOM_MODEL = "uncurated random"
BALANCED_MODEL = "balanced"
# Input name -> the arm its teacher is replicate 0 of, in table order.
COMPARED_INPUTS = {
    "curated_exports": CURATED_MODEL,
    "random_exports": RANDOM_MODEL,
    "balanced_exports": BALANCED_MODEL,
}
# The arms whose rows are the same in every replicate (only the training seed changes): arm -> input.
FIXED_ROWS_INPUTS = {CURATED_MODEL: "curated", BALANCED_MODEL: "balanced"}
# Every other arm is compared with this one (it is what no curation gives).
BASELINE_ARM = RANDOM_MODEL
REPLICATES_DIR = "replicates"
SAMPLE_DIR = "sample"
LINEAR_METRIC = "linear"
logger = logging.getLogger(__name__)

# The evaluation rows of every replicate's teacher; `replicate` is null on the raw-pixel baseline,
# which has no seed.
ABLATION_RESULTS = ManifestSchema(
    name="ablation_results",
    version=1,
    fields=(*EVAL_RESULTS.fields, pa.field("replicate", pa.int32(), nullable=True)),
)

PRETRAIN_RANDOM = register_stage(
    dataclasses.replace(
        PRETRAIN,
        name="pretrain_random",
        description="the pretrain stage on a random sample of the uncurated pool (the ablation's baseline)",
    )
)
PRETRAIN_BALANCED = register_stage(
    dataclasses.replace(
        PRETRAIN,
        name="pretrain_balanced",
        description="the pretrain stage on the balanced sample of the pool (hierarchical k-means)",
    )
)


@dataclass(frozen=True, kw_only=True, slots=True)
class DataAblationConfig:
    """The data ablation (the job's `ablate_data` section, read by random_pool and ablate_data)."""

    seed: int = 0
    """Seeds random_pool's sample for replicate 0; replicate r draws with seed + r."""
    replicates: int = 3
    """Pretrainings per arm (curated, random), replicate r with the pretrain section's train.seed + r:
    the spread that tells a difference from seed noise. Replicate 0 is the pretrain and pretrain_random
    stages' own run."""

    def __post_init__(self) -> None:
        require(self.replicates >= 1, f"replicates must be >= 1, got {self.replicates}")


@dataclass(frozen=True, kw_only=True, slots=True)
class AblateDataConfig:
    """The three sections of the job ablate_data reads: its own, the pretraining recipe both arms share,
    and the evaluation protocol."""

    ablate_data: DataAblationConfig = field(default_factory=DataAblationConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


def teacher_export(exports: Manifest, input_name: str) -> dict[str, Any]:
    """The teacher row of a pretraining run's exports manifest."""
    rows = [row for row in read_exports(exports) if row["model"] == TEACHER_MODEL]
    if len(rows) != 1:
        raise ValueError(f"ablate_data: {input_name} must hold one {TEACHER_MODEL!r} row, found {len(rows)}")
    return rows[0]


def replicate_recipe(recipe: PretrainConfig, replicate: int) -> PretrainConfig:
    """The pretraining recipe of replicate r: everything equal but the training seed, seed + r."""
    return dataclasses.replace(
        recipe, train=dataclasses.replace(recipe.train, seed=recipe.train.seed + replicate)
    )


def train_replicate(
    recipe: PretrainConfig, images: pa.Table, images_uri: str, ctx: StageContext, folder: str
) -> dict[str, Any]:
    """One replicate's teacher, trained (or resumed) under the stage's `replicates/<folder>`."""
    root = ctx.local_dir(f"{REPLICATES_DIR}/{folder}")
    run_dir = root / RUN_DIR
    run_dir.mkdir(exist_ok=True)
    logger.info(
        "ablate_data: pretraining %s (%d images, seed %d)", folder, images.num_rows, recipe.train.seed
    )
    return train_teacher(recipe, images, images_uri, run_dir, root / BACKBONE_FILE, ctx.show_progress)


def write_sample(ctx: StageContext, folder: str, rows: pa.Table) -> str:
    """Writes a replicate's random sample as a manifest (what torchrun ranks read; inspectable later)."""
    sample = ctx.local_dir(f"{REPLICATES_DIR}/{folder}/{SAMPLE_DIR}")
    pq.write_table(CURATED.validate(rows), sample / part_name("all"))
    return str(sample)


def replicate_teachers(
    cfg: AblateDataConfig, inputs: Mapping[str, Manifest], ctx: StageContext
) -> dict[str, list]:
    """Arm -> its teachers' export rows, replicate 0 (the upstream stages') first."""
    teachers = {model: [teacher_export(inputs[name], name)] for name, model in COMPARED_INPUTS.items()}
    if cfg.ablate_data.replicates == 1:
        return teachers
    fixed_rows = {arm: inputs[name].read(CURATED) for arm, name in FIXED_ROWS_INPUTS.items()}
    curated = fixed_rows[CURATED_MODEL]
    samples = inputs["random_samples"].read(CURATED_REPLICATES)
    replicate_of_row = samples.column("replicate").to_numpy()
    for replicate in range(1, cfg.ablate_data.replicates):
        recipe = replicate_recipe(cfg.pretrain, replicate)
        for arm, rows in fixed_rows.items():
            folder = f"{arm}-{replicate}"
            uri = inputs[FIXED_ROWS_INPUTS[arm]].uri
            teachers[arm].append(train_replicate(recipe, rows, uri, ctx, folder))
        sample = samples.filter(replicate_of_row == replicate).drop_columns(["replicate"])
        if sample.num_rows != curated.num_rows:
            raise ValueError(
                f"ablate_data: random_pool holds {sample.num_rows} rows for replicate {replicate}, the "
                f"curated set {curated.num_rows}; rerun random_pool with the same ablate_data section"
            )
        folder = f"random-{replicate}"
        teachers[RANDOM_MODEL].append(
            train_replicate(recipe, sample, write_sample(ctx, folder, sample), ctx, folder)
        )
    return teachers


def evaluate_replicates(
    cfg: EvaluateConfig, data: EvalData, teachers: Mapping[str, list], show_progress: bool
) -> list[tuple[ModelResult, int | None]]:
    """(result, replicate) for every teacher, arm by arm, then the raw pixels (no replicate)."""
    results: list[tuple[ModelResult, int | None]] = []
    for model, exports in teachers.items():
        for replicate, export in enumerate(exports):
            result = evaluate_backbone(
                export, data.train, data.test, cfg, device=data.device, show_progress=show_progress
            )
            results.append((dataclasses.replace(result, model=model), replicate))
    pixels = evaluate_raw_pixels(data.train, data.test, cfg, device=data.device, show_progress=show_progress)
    results.append((pixels, None))
    return results


# -- the summary: per arm mean and std, the paired difference -------------------------------------------


def metric_name(row: Mapping[str, Any]) -> str:
    """k-NN rows by their k; the linear probe as one metric whatever learning rate each replicate chose."""
    return f"k-NN {row['setting']}" if row["protocol"] == KNN_PROTOCOL else LINEAR_METRIC


@dataclass(frozen=True, slots=True)
class MetricSummary:
    """One metric (k-NN at one k, or the linear probe) of the ablation."""

    metric: str
    arms: dict[str, Spread]  # curated, uncurated random, balanced
    paired: dict[str, PairedDifference]  # arm -> arm - random, for every arm but random
    baselines: dict[str, float]  # models without replicates (raw pixels)


def summarise(results: pa.Table) -> list[MetricSummary]:
    """The ablation's summary per metric, from its ABLATION_RESULTS rows (replicates in order)."""
    rows = results.to_pylist()
    summaries = []
    for metric in dict.fromkeys(metric_name(row) for row in rows):
        mine = [row for row in rows if metric_name(row) == metric]
        replicated = sorted(
            (row for row in mine if row["replicate"] is not None), key=lambda row: row["replicate"]
        )
        per_arm = {
            model: [row["top1"] for row in replicated if row["model"] == model]
            for model in COMPARED_INPUTS.values()
        }
        summaries.append(
            MetricSummary(
                metric,
                {model: spread(values) for model, values in per_arm.items()},
                {
                    model: paired_difference(values, per_arm[BASELINE_ARM])
                    for model, values in per_arm.items()
                    if model != BASELINE_ARM
                },
                {row["model"]: row["top1"] for row in mine if row["replicate"] is None},
            )
        )
    return summaries


def points(value: float, signed: bool = False) -> str:
    return f"{PERCENT * value:{'+' if signed else ''}.1f}"


def verdict(arm: str, paired: PairedDifference) -> str:
    if paired.count < 2:
        return "one replicate: no seed spread to compare with"
    interval = f"95% interval [{points(paired.low, True)}, {points(paired.high, True)}]"
    if not paired.beyond_noise:
        return f"{interval}: within the seed noise"
    return f"{interval}: {arm} {'better' if paired.mean > 0 else 'worse'} beyond the seed noise"


def summary_cells(summaries: Sequence[MetricSummary]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per metric) of the ablation's table, in percent."""
    baselines = list(dict.fromkeys(name for summary in summaries for name in summary.baselines))
    header = ["metric", *(f"{model} (%)" for model in (*COMPARED_INPUTS.values(), *baselines))]
    compared = [model for model in COMPARED_INPUTS.values() if model != BASELINE_ARM]
    for model in compared:
        header += [f"{model} - random (points)", f"{model}: verdict"]
    rows = []
    for summary in summaries:
        arms = [f"{points(arm.mean)} ± {points(arm.std)}" for arm in summary.arms.values()]
        pixels = [points(summary.baselines[name]) if name in summary.baselines else "" for name in baselines]
        differences = []
        for model in compared:
            paired = summary.paired[model]
            differences += [f"{points(paired.mean, True)} ± {points(paired.std)}", verdict(model, paired)]
        rows.append([summary.metric, *arms, *pixels, *differences])
    return header, rows


def table_markdown(results: pa.Table, title: str) -> str:
    """table2.md: the summary (mean ± std over replicates), then every replicate's numbers."""
    summaries = summarise(results)
    replicates = summaries[0].paired[CURATED_MODEL].count if summaries else 0
    header, rows = summary_cells(summaries)
    lines = [
        f"### {title}",
        "",
        f"{replicates} replicates per arm (seed r for every arm of replicate r):",
        "",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [
        "",
        "Per replicate (top-1 %):",
        "",
        "| model | replicate | metric | top-1 (%) |",
        "|---|---|---|---|",
    ]
    for row in results.to_pylist():
        replicate = "-" if row["replicate"] is None else str(row["replicate"])
        lines.append(f"| {row['model']} | {replicate} | {metric_name(row)} | {points(row['top1'])} |")
    return "\n".join(lines) + "\n"


def summary_stats(summaries: Sequence[MetricSummary]) -> dict[str, Any]:
    return {
        summary.metric: {
            **{f"{model}_mean": arm.mean for model, arm in summary.arms.items()},
            **{f"{model}_std": arm.std for model, arm in summary.arms.items()},
            **summary.baselines,
            **{
                f"{model}_minus_random": {
                    "mean": paired.mean,
                    "std": paired.std,
                    "low": paired.low,
                    "high": paired.high,
                    "beyond_noise": paired.beyond_noise,
                }
                for model, paired in summary.paired.items()
            },
        }
        for summary in summaries
    }


def run_ablate_data(
    cfg: AblateDataConfig, inputs: Mapping[str, Manifest], ctx: StageContext
) -> dict[str, Any]:
    untrained = [name for name in COMPARED_INPUTS if inputs[name].num_rows == 0]
    if untrained:
        ctx.write_output("results", ABLATION_RESULTS.empty_table())
        ctx.warn(f"nothing was trained for {', '.join(untrained)}; nothing evaluated")
        return {"replicates": 0, "metrics": {}}
    if inputs["balanced"].num_rows != inputs["curated"].num_rows:
        raise ValueError(
            f"ablate_data: the balanced sample holds {inputs['balanced'].num_rows} rows, the curated set "
            f"{inputs['curated'].num_rows}; the arms compare at equal size (balance.target_rows: null)"
        )
    teachers = replicate_teachers(cfg, inputs, ctx)
    data = load_eval_data(cfg.evaluate)
    evaluated = evaluate_replicates(cfg.evaluate, data, teachers, ctx.show_progress)
    rows = [
        {**row, "replicate": replicate}
        for result, replicate in evaluated
        for row in result_rows(result, data.name)
    ]
    results = ABLATION_RESULTS.table_from_rows(rows)
    ctx.write_output("results", results)
    title = (
        f"Pretraining data, curated vs uncurated random vs balanced (same size, same recipe): "
        f"{data.name}, {len(data.train)} train / {len(data.test)} test images"
    )
    ctx.write_artifact(TABLE_FILE, table_markdown(results, title).encode())
    return {
        "dataset": data.name,
        "train_images": len(data.train),
        "test_images": len(data.test),
        "replicates": cfg.ablate_data.replicates,
        "metrics": summary_stats(summarise(results)),
    }


def ablation_tables(run: StageRun) -> list[TableView]:
    """The report's view: mean ± std per arm over replicates and the paired difference, per metric."""
    header, rows = summary_cells(summarise(run.outputs["results"].read(ABLATION_RESULTS)))
    replicates = run.record["stats"].get("replicates", 0)
    return [
        table_view(
            f"curated vs uncurated random vs balanced pretraining, {replicates} replicates per arm",
            header,
            rows,
        )
    ]


ABLATE_DATA = register_stage(
    StageSpec(
        name="ablate_data",
        # 5: the balanced arm (balance's sample); each arm's difference from random
        # 4: the DINO/iBOT cross-entropy and Sinkhorn-Knopp sum in another order (same maths, other last bits)
        # 3: replicates per arm (mean, std, paired difference); 2: the raw-pixel baseline
        version=5,
        config_type=AblateDataConfig,
        fn=run_ablate_data,
        inputs={
            **dict.fromkeys(COMPARED_INPUTS, EXPORTS),
            "curated": CURATED,
            "random_samples": CURATED_REPLICATES,
            "balanced": CURATED,
        },
        outputs={"results": ABLATION_RESULTS},
        description="curated vs random-pool vs balanced pretraining over seed replicates: k-NN and linear "
        "probe of every teacher, mean, std and each arm's paired difference from random",
        tables=ablation_tables,
    )
)
