"""CUDA-only checks, run by benchmarks/gpu_check.sh on a GPU machine (deselected by -m "not gpu")."""

from __future__ import annotations

import pytest
import torch

from training.models import attention
from training.models.vit import build_vit

pytestmark = pytest.mark.gpu

BF16_TOLERANCE = 3e-2


@pytest.fixture(autouse=True)
def needs_cuda():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device; run them through benchmarks/gpu_check.sh")


def test_packed_xformers_attention_equals_separate_sdpa_forwards_in_bf16():
    assert attention.xformers_ops() is not None, "xFormers must be installed for this check"
    torch.manual_seed(0)
    model = build_vit("vit_small", patch_size=14, img_size=224).cuda().eval()
    global_crops = torch.randn(4, 3, 224, 224, device="cuda")
    local_crops = torch.randn(16, 3, 98, 98, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.inference_mode():
        packed = model.forward_features([global_crops, local_crops], masks=[None, None])
        separate = [model.forward_features(global_crops), model.forward_features(local_crops)]
    for packed_group, separate_group in zip(packed, separate, strict=True):
        for key in ("x_norm_clstoken", "x_norm_patchtokens"):
            torch.testing.assert_close(
                packed_group[key].float(),
                separate_group[key].float(),
                atol=BF16_TOLERANCE,
                rtol=BF16_TOLERANCE,
            )
