"""One training step of the official DINOv2 code (PyPI `dinov2` 0.0.1.dev2, April 2023) on CPU: the
baseline row of `benchmarks.train_step`. Runs in its own process with the official package on the path
(`make official-baseline` installs it with --no-deps into build/official-dinov2, so lvd's torch stays):

    PYTHONPATH=build/official-dinov2 python benchmarks/official_step.py '{"arch": ..., "batch": ...}'

It imports nothing of lvd. The official code needs CUDA and xFormers; the patches below change where
tensors live and which kernel computes attention, not the math:
  - `Tensor.cuda` returns the tensor itself (the batch stays on the CPU);
  - `xformers.ops` is a small stand-in: memory_efficient_attention is PyTorch SDPA, run per crop group
    for the block-diagonal mask of the nested (packed) forward; unbind, index_select_cat and
    scaled_index_add are their one-line torch equivalents;
  - without FSDP (a world of one) there are no FSDP streams to share, and the EMA update and gradient
    clipping go over the modules' own parameters (the official code: FSDP's flat parameters, same values).
"""

from __future__ import annotations

import json
import resource
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

KIB = 1024
WARMUP_STEPS = 1
SOURCE_IMAGE_SIDE = 256
ARCH_NAMES = {"vit_small": "vit_small", "vit_base": "vit_base", "vit_large": "vit_large"}


class BlockDiagonalMask:
    """xFormers' mask for packed sequences: here, the sequence lengths and the crop groups' batch sizes."""

    def __init__(self, seqlens: list[int]):
        self.seqlens = seqlens
        self._batch_sizes: list[int] | None = None

    @classmethod
    def from_seqlens(cls, seqlens):
        return cls(list(seqlens))

    @classmethod
    def from_tensor_list(cls, tensors):
        """The mask of `tensors` (b_i, n_i, ...) packed into one sequence, and that sequence."""
        mask = cls([tensor.shape[1] for tensor in tensors for _ in range(tensor.shape[0])])
        mask._batch_sizes = [tensor.shape[0] for tensor in tensors]
        return mask, torch.cat([tensor.reshape(1, -1, *tensor.shape[2:]) for tensor in tensors], dim=1)

    def groups(self) -> list[tuple[int, int]]:
        """(images, tokens each) per crop group, in order."""
        out, start = [], 0
        for batch in self._batch_sizes:
            out.append((batch, self.seqlens[start]))
            start += batch
        return out

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        sizes = [batch * tokens for batch, tokens in self.groups()]
        return [
            chunk.reshape(batch, tokens, *tensor.shape[2:])
            for chunk, (batch, tokens) in zip(tensor.split(sizes, dim=1), self.groups(), strict=True)
        ]


def memory_efficient_attention(q, k, v, attn_bias=None, op=None):
    """(B, N, H, D) in xFormers' layout; SDPA per crop group under a block-diagonal mask."""
    del op
    if attn_bias is None:
        heads_first = (tensor.transpose(1, 2) for tensor in (q, k, v))
        return F.scaled_dot_product_attention(*heads_first).transpose(1, 2)
    outputs = []
    for qs, ks, vs, (batch, tokens) in zip(
        *(attn_bias.split(t) for t in (q, k, v)), attn_bias.groups(), strict=True
    ):
        out = F.scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2))
        outputs.append(out.transpose(1, 2).reshape(1, batch * tokens, *q.shape[2:]))
    return torch.cat(outputs, dim=1)


def index_select_cat(sources, indices):
    return torch.cat([source[index].flatten() for source, index in zip(sources, indices, strict=True)])


def scaled_index_add(x, index, source, scaling, alpha):
    return torch.index_add(x, 0, index, source * scaling, alpha=alpha)


def install_stand_ins() -> None:
    fmha = types.SimpleNamespace(
        BlockDiagonalMask=BlockDiagonalMask, MemoryEfficientAttentionFlashAttentionOp=None
    )
    ops = types.ModuleType("xformers.ops")
    ops.fmha = fmha
    ops.memory_efficient_attention = memory_efficient_attention
    ops.unbind = torch.unbind
    ops.index_select_cat = index_select_cat
    ops.scaled_index_add = scaled_index_add
    package = types.ModuleType("xformers")
    package.ops = ops
    sys.modules |= {"xformers": package, "xformers.ops": ops}
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def official_config(request: dict):
    import dinov2.configs
    from omegaconf import OmegaConf

    default = OmegaConf.load(Path(dinov2.configs.__file__).parent / "ssl_default_config.yaml")
    overrides = {
        "student": {
            "arch": ARCH_NAMES[request["arch"]],
            "patch_size": 14,
            "drop_path_rate": request["drop_path_rate"],
        },
        "crops": {"global_crops_size": 224, "local_crops_size": 98, "local_crops_number": 8},
        "train": {"batch_size_per_gpu": request["batch"], "centering": request["centering"]},
        "compute_precision": {"grad_scaler": False},
    }
    return OmegaConf.merge(default, OmegaConf.create(overrides))


def official_batch(cfg, seed: int) -> dict:
    from dinov2.data import DataAugmentationDINO, MaskingGenerator, collate_data_and_cast
    from PIL import Image

    rng = np.random.default_rng(seed)
    augment = DataAugmentationDINO(
        cfg.crops.global_crops_scale,
        cfg.crops.local_crops_scale,
        cfg.crops.local_crops_number,
        global_crops_size=cfg.crops.global_crops_size,
        local_crops_size=cfg.crops.local_crops_size,
    )
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    images = [
        Image.fromarray(rng.integers(0, 256, (SOURCE_IMAGE_SIDE, SOURCE_IMAGE_SIDE, 3), dtype=np.uint8))
        for _ in range(cfg.train.batch_size_per_gpu)
    ]
    return collate_data_and_cast(
        [(augment(image), None) for image in images],
        mask_ratio_tuple=cfg.ibot.mask_ratio_min_max,
        mask_probability=cfg.ibot.mask_sample_probability,
        n_tokens=grid * grid,
        mask_generator=MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid),
        dtype=torch.float32,
    )


def measure(request: dict) -> dict:
    install_stand_ins()
    from dinov2.train.ssl_meta_arch import SSLMetaArch

    # A world of one: the official losses all-reduce their Sinkhorn-Knopp sums unconditionally.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    cfg = official_config(request)
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    model.teacher.load_state_dict(model.student.state_dict())
    model.need_to_synchronize_fsdp_streams = False  # FSDP's CUDA stream sharing; no FSDP here
    model.train()
    groups = model.get_params_groups()
    optimizer = torch.optim.AdamW(groups, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))
    batch = official_batch(cfg, seed=0)
    student = [p for m in model.student.values() for p in m.parameters()]
    teacher = [p for m in model.teacher.values() for p in m.parameters()]
    timings = []
    for index in range(WARMUP_STEPS + request["steps"]):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model.forward_backward(batch, teacher_temp=cfg.teacher.teacher_temp)
        for module in model.student.values():
            torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.optim.clip_grad)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_mul_(teacher, cfg.teacher.momentum_teacher)
            torch._foreach_add_(teacher, student, alpha=1 - cfg.teacher.momentum_teacher)
        if index >= WARMUP_STEPS:
            timings.append(time.perf_counter() - started)
    dist.destroy_process_group()
    seconds = float(np.median(timings))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB
    return {"seconds_per_step": seconds, "images_per_s": request["batch"] / seconds, "peak_mib": peak_mib}


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
