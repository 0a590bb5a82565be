"""What each way of choosing pretraining images buys on the demo: concept balance and downstream k-NN.

    python -m benchmarks.curation_balance [--preset demo] [--demo-data build/demo-data]

Reads the committed runs of the demo job (run `lvd ablate-data --preset demo` first): the pool after
decontamination, random_pool's sample, assemble's curated set (retrieval, with its seeds as is) and
balance's sample (hierarchical k-means), all of one size. Each image's concept comes from the demo's
answer key (a Fashion-MNIST class, an Openclipart category, or its origin); the balance of each set is
the evenness (entropy / log of the number of concepts) and the Gini coefficient of its concept counts
over every concept of the pool and seed images. The k-NN top-1 of pretraining on each set comes from
ablate_data (mean ± std over its replicates, each arm's paired difference from random).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.demo.scoring import ConceptBalance, concept_balance
from flows.curate_and_train import CURATE_AND_TRAIN
from flows.dag import committed_runs
from pipelines.store import Store
from training.ablate import BALANCED_MODEL, CURATED_MODEL, RANDOM_MODEL

GROUND_TRUTH_FILE = "ground_truth.parquet"
DEFAULT_DEMO_DATA = "build/demo-data"
KNN_METRIC = "k-NN k=20"
PERCENT = 100
# Set name -> (stage, output) holding it, and the ablation arm that pretrained on it.
SETS = {
    "random sample of the pool": ("random_pool", "curated", RANDOM_MODEL),
    "retrieval (curated set)": ("assemble", "curated", CURATED_MODEL),
    "balanced (hierarchical k-means)": ("balance", "curated", BALANCED_MODEL),
}


def measure(preset: str, demo_data: Path) -> dict[str, Any]:
    cfg = CURATE_AND_TRAIN.resolve_config(preset)
    runs = committed_runs(CURATE_AND_TRAIN, CURATE_AND_TRAIN.all_nodes, cfg, Store(cfg.store))
    missing = [stage for stage, _, _ in SETS.values() if runs.get(stage) is None]
    if missing or runs.get("decontaminate") is None:
        raise SystemExit(
            f"no committed run of {missing or ['decontaminate']}: run `lvd ablate-data --preset {preset}`"
        )
    truth = pq.read_table(demo_data / GROUND_TRUTH_FILE)
    images = runs["decontaminate"].outputs["images"].read()
    pool = images.filter(pc.equal(images.column("role"), "uncurated")).column("uri").to_pylist()
    universe = images.filter(pc.not_equal(images.column("role"), "eval")).column("uri").to_pylist()
    balance = {"decontaminated pool": concept_balance(pool, truth, universe)}
    for name, (stage, output, _) in SETS.items():
        balance[name] = concept_balance(
            runs[stage].outputs[output].read().column("uri").to_pylist(), truth, universe
        )
    ablation = runs.get("ablate_data")
    knn = ablation.record["stats"]["metrics"].get(KNN_METRIC) if ablation is not None else None
    replicates = ablation.record["stats"]["replicates"] if ablation is not None else 0
    return {"balance": balance, "knn": knn, "replicates": replicates}


def knn_cells(knn: dict[str, Any] | None, arm: str | None) -> tuple[str, str]:
    if knn is None or arm is None:
        return "", ""
    mean, std = PERCENT * knn[f"{arm}_mean"], PERCENT * knn[f"{arm}_std"]
    paired = knn.get(f"{arm}_minus_random")
    difference = "" if paired is None else f"{PERCENT * paired['mean']:+.1f} ± {PERCENT * paired['std']:.1f}"
    return f"{mean:.1f} ± {std:.1f}", difference


def report(result: dict[str, Any]) -> None:
    balance: dict[str, ConceptBalance] = result["balance"]
    first = next(iter(balance.values()))
    print(
        f"concept balance over the {first.pool_concepts} concepts of the pool and seed images; "
        f"{KNN_METRIC} top-1 % of pretraining on each set ({result['replicates']} replicates)"
    )
    header = f"{'set':<34}{'rows':>7}{'concepts':>10}{'evenness':>10}{'Gini':>7}{'largest':>9}"
    print(f"{header}  {'k-NN top-1':>12}  {'vs random':>12}")
    arms = {name: arm for name, (_, _, arm) in SETS.items()}
    for name, score in balance.items():
        knn, difference = knn_cells(result["knn"], arms.get(name))
        print(
            f"{name:<34}{score.rows:>7,}{score.concepts:>10}{score.evenness:>10.3f}{score.gini:>7.3f}"
            f"{score.largest_share:>9.1%}  {knn:>12}  {difference:>12}"
        )
    if result["knn"] is not None:
        print(f"raw pixels {KNN_METRIC}: {PERCENT * result['knn']['raw_pixels']:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--demo-data", type=Path, default=Path(DEFAULT_DEMO_DATA))
    args = parser.parse_args()
    report(measure(args.preset, args.demo_data))


if __name__ == "__main__":
    main()
