"""`torchrun` entry point: one training process of a multi-process (or multi-node) pretraining run.

    torchrun --nproc_per_node=N [--nnodes ...] -m training.launch --config run.json --images URI --out DIR

`--config` holds the `pretrain` section as JSON (what `lvd` writes for the stage), `--images` the
curated manifest. Every process runs `training.trainer.train`; rank 0 writes metrics and commits
checkpoints.
"""

from __future__ import annotations

import argparse

from pipelines.config import build_config, load_file
from pipelines.manifest import read_manifest
from training.config import PretrainConfig
from training.parallel import leave_rank
from training.trainer import train

SECTION = "pretrain"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON file with the pretrain config section")
    parser.add_argument("--images", required=True, help="the curated (or images) manifest to train on")
    parser.add_argument("--out", required=True, help="run folder: checkpoints and metrics")
    args = parser.parse_args(argv)
    cfg = build_config(PretrainConfig, load_file(args.config), SECTION)
    train(cfg, read_manifest(args.images), args.out)


if __name__ == "__main__":
    main()
    leave_rank()
