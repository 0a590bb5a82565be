#!/usr/bin/env bash
# The GPU checks of issues 5 and 17, for a lent GPU machine; about 5 minutes on one H100.
#   bash benchmarks/gpu_check.sh            (from the repository root, torch installed)
# 0. The `gpu` extra (xFormers, faiss-gpu-cu12) replaces faiss-cpu: the two builds are the same package.
# 1. CUDA-only correctness (tests/gpu): packed xFormers attention equals separate SDPA forwards (bf16);
#    Faiss exact, IVF and sharded search and k-means on the GPUs agree with the CPU.
# 2. ViT-S/14 and ViT-L/14 training-step throughput (images/s) and peak GPU memory, SDPA vs xFormers,
#    bf16, through the same FSDP2 path (a world of one), batch 32: 2 x 224 + 8 x 98 crops per image.
# 3. Faiss GPU vs CPU on 1M x 128: k-means (4,096 clusters), exact and IVF search, seconds and agreement.
set -euo pipefail
PYTHON="${PYTHON:-python}"
if ! "$PYTHON" -c "import sys, faiss; sys.exit(faiss.get_num_gpus() == 0)" 2>/dev/null; then
    "$PYTHON" -m pip uninstall --yes --quiet faiss-cpu || true
    "$PYTHON" -m pip install --quiet -e '.[gpu]'
fi
"$PYTHON" -c "import torch, xformers, faiss; print('torch', torch.__version__, '| xformers', xformers.__version__, '| faiss', faiss.__version__, faiss.get_num_gpus(), 'GPU(s) |', torch.cuda.get_device_name())"
"$PYTHON" -m pytest -q -m gpu tests/gpu -p no:cacheprovider
"$PYTHON" -m benchmarks.train_step --device cuda --precision bf16 --arch vit_small vit_large \
    --batch 32 --steps 5 --variants sdpa xformers
"$PYTHON" -m benchmarks.faiss_gpu
