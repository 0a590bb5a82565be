"""`torchrun` entry point: one process of a multi-process distillation run.

    torchrun --nproc_per_node=N -m distillation.launch --config distill.json --images URI --out DIR

`--config` holds the `distill` section as JSON with `teacher_source` resolved (the stage writes it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distillation.config import DistillConfig
from distillation.stage import distill
from pipelines.config import build_config, load_file
from pipelines.manifest import read_manifest

SECTION = "distill"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m distillation.launch", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config", required=True, help="JSON file with the distill config section")
    parser.add_argument("--images", required=True, help="the curated manifest to train on")
    parser.add_argument("--out", required=True, help="run folder: checkpoints and metrics")
    args = parser.parse_args(argv)
    cfg = build_config(DistillConfig, load_file(args.config), SECTION)
    if not cfg.teacher_source:
        raise SystemExit("distill.teacher_source must name the teacher (a checkpoint folder or a .pth file)")
    distill(cfg, read_manifest(args.images), Path(args.out))


if __name__ == "__main__":
    main()
