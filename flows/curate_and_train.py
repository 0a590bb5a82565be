"""The `curate-and-train` job: which stages run, what feeds what, and the config sections that makes.

    ingest -> exact_dedup -> phash_dedup -> copy_descriptor -> copy_dedup -> decontaminate -> embed
      -> cluster -> retrieve -> assemble -> pretrain -> distill -> evaluate

(copy_descriptor trains on phash_dedup's rows; copy_dedup and decontaminate both use its model)

and, only when asked, the data ablation (the paper's Table 2 in miniature, plus DINOv3's balanced
sampling as a third arm):

    decontaminate + assemble -> random_pool -> pretrain_random ----> ablate_data <- pretrain
    embed + decontaminate + assemble -> balance -> pretrain_balanced -^  (+ the seed replicates of each arm)

Each stage's config is the job config's section of its name, except where a node says otherwise: the
ablation's random pool reads `ablate_data`, its pretrainings `pretrain` (only the data differs), and
ablate_data reads all three it needs: `ablate_data` (replicates), `pretrain` (their recipe) and
`evaluate`. `CurateAndTrainConfig` is made from these sections, plus `store` and `runtime`.
"""

from __future__ import annotations

import curation  # noqa: F401  (registers the curation stages, random_pool included)
import distillation  # noqa: F401  (registers the distill stage)
import training  # noqa: F401  (registers pretrain, evaluate and the ablation stages)
from flows.dag import Dag, node

ABLATE_DATA = "ablate_data"

CURATE_AND_TRAIN = Dag(
    "curate-and-train",
    (
        node("ingest"),
        node("exact_dedup", "ingest.images"),
        node("phash_dedup", "exact_dedup.images"),
        node("copy_descriptor", "phash_dedup.images"),
        node("copy_dedup", "phash_dedup.images", "copy_descriptor.model"),
        node("decontaminate", "copy_dedup.images", "copy_dedup.descriptors", "copy_descriptor.model"),
        node("embed", "decontaminate.images"),
        node("cluster", "embed.embeddings"),
        node("retrieve", "embed.embeddings", "cluster.assignments", "cluster.centroids"),
        node("assemble", "decontaminate.images", "retrieve.retrieved", "retrieve.summary"),
        node("pretrain", "assemble.curated"),
        node("distill", "assemble.curated", "pretrain.exports"),
        node("evaluate", "distill.exports"),
    ),
    branches={
        ABLATE_DATA: (
            node("random_pool", "decontaminate.images", "assemble.curated", section="ablate_data"),
            node("balance", "embed.embeddings", "decontaminate.images", "assemble.curated"),
            node("pretrain_random", "random_pool.curated", section="pretrain"),
            node("pretrain_balanced", "balance.curated", section="pretrain"),
            node(
                "ablate_data",
                "pretrain.exports",
                "pretrain_random.exports",
                "pretrain_balanced.exports",
                "assemble.curated",
                "random_pool.replicates",
                "balance.curated",
                section=("ablate_data", "pretrain", "evaluate"),
            ),
        )
    },
    config_name="CurateAndTrainConfig",
    module=__name__,
)
# Bound here under its own name so that pickle (Prefect, Ray) finds the class.
CurateAndTrainConfig = CURATE_AND_TRAIN.config_type
