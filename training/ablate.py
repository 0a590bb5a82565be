"""The paper's Table 2 in miniature: the same pretraining on curated and on random pool data, compared.

    random_pool's curated-shaped sample --pretrain_random (pretrain's function, same `pretrain` section)-->
      exports (its teacher)
    pretrain's exports + pretrain_random's exports --ablate_data: evaluate_backbone on each teacher,
      with the `evaluate` section--> `results` manifest (models "curated" and "uncurated random", then
      the raw-pixel baseline),
      artifacts/table2.md

A second stage name for the random-data pretraining keeps its runs apart from the curated one's in the
store and in every summary, while the function and its config stay exactly those of `pretrain`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pipelines.stage import Manifest, StageContext, StageSpec, register_stage
from training.eval.config import EvaluateConfig
from training.eval.results import EVAL_RESULTS, accuracy_tables, result_rows, results_markdown
from training.eval.stage import evaluate_backbone, evaluate_raw_pixels, evaluation_stats, load_eval_data
from training.exports import EXPORTS, read_exports
from training.stages import PRETRAIN, TEACHER_MODEL

TABLE_FILE = "table2.md"
CURATED_MODEL = "curated"
RANDOM_MODEL = "uncurated random"
# Input name -> the model name its teacher gets in the results, in table order.
COMPARED_INPUTS = {"curated_exports": CURATED_MODEL, "random_exports": RANDOM_MODEL}

PRETRAIN_RANDOM = register_stage(
    dataclasses.replace(
        PRETRAIN,
        name="pretrain_random",
        description="the pretrain stage on a random sample of the uncurated pool (the ablation's baseline)",
    )
)


def teacher_export(exports: Manifest, input_name: str) -> dict[str, Any]:
    """The teacher row of a pretraining run's exports manifest."""
    rows = [row for row in read_exports(exports) if row["model"] == TEACHER_MODEL]
    if len(rows) != 1:
        raise ValueError(f"ablate_data: {input_name} must hold one {TEACHER_MODEL!r} row, found {len(rows)}")
    return rows[0]


def run_ablate_data(cfg: EvaluateConfig, inputs: Mapping[str, Manifest], ctx: StageContext) -> dict[str, Any]:
    untrained = [name for name in COMPARED_INPUTS if inputs[name].num_rows == 0]
    if untrained:
        ctx.write_output("results", EVAL_RESULTS.empty_table())
        ctx.warn(f"nothing was trained for {', '.join(untrained)}; nothing evaluated")
        return {"models": {}}
    data = load_eval_data(cfg)
    results = [
        dataclasses.replace(
            evaluate_backbone(
                teacher_export(inputs[name], name),
                data.train,
                data.test,
                cfg,
                device=data.device,
                show_progress=ctx.show_progress,
            ),
            model=model,
        )
        for name, model in COMPARED_INPUTS.items()
    ]
    results.append(
        evaluate_raw_pixels(data.train, data.test, cfg, device=data.device, show_progress=ctx.show_progress)
    )
    rows = [row for result in results for row in result_rows(result, data.name)]
    ctx.write_output("results", EVAL_RESULTS.table_from_rows(rows))
    title = (
        f"Pretraining data, curated vs uncurated random (same size, same recipe): "
        f"{data.name}, {len(data.train)} train / {len(data.test)} test images"
    )
    ctx.write_artifact(TABLE_FILE, results_markdown(results, cfg.knn_ks, title).encode())
    return evaluation_stats(cfg, data, results)


ABLATE_DATA = register_stage(
    StageSpec(
        name="ablate_data",
        version=2,  # 2: the raw-pixel baseline is scored beside the two teachers
        config_type=EvaluateConfig,
        fn=run_ablate_data,
        inputs=dict.fromkeys(COMPARED_INPUTS, EXPORTS),
        outputs={"results": EVAL_RESULTS},
        description="k-NN and linear probe of the teachers pretrained on curated and on random pool data",
        tables=accuracy_tables,
    )
)
