#!/usr/bin/env bash
# The GPU check of issue 5, for a lent GPU machine; about 3 minutes on one H100.
#   bash benchmarks/gpu_check.sh            (from the repository root, torch + xformers installed)
# 1. CUDA-only correctness: packed xFormers attention equals separate SDPA forwards (bf16).
# 2. ViT-S/14 and ViT-L/14 training-step throughput (images/s) and peak GPU memory, SDPA vs xFormers,
#    bf16, through the same FSDP2 path (a world of one), batch 32: 2 x 224 + 8 x 98 crops per image.
set -euo pipefail
PYTHON="${PYTHON:-python}"
"$PYTHON" -c "import torch, xformers; print('torch', torch.__version__, '| xformers', xformers.__version__, '|', torch.cuda.get_device_name())"
"$PYTHON" -m pytest -q -m gpu tests/gpu -p no:cacheprovider
"$PYTHON" -m benchmarks.train_step --device cuda --precision bf16 --arch vit_small vit_large \
    --batch 32 --steps 5 --variants sdpa xformers
