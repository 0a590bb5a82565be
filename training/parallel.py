"""Processes, devices and FSDP2 sharding: the one place training touches torch.distributed setup.

    torchrun env (RANK, WORLD_SIZE, LOCAL_RANK) or nothing -> process group (nccl on CUDA, gloo on CPU;
      a world of one in a plain process) -> 1-D device mesh -> fully_shard(block) for every block,
      then fully_shard(module) for the rest

A plain process gets a world of one, so one CPU process runs exactly the sharded code path that N GPUs
run (every parameter is a DTensor either way). Compute precision comes from FSDP2's
MixedPrecisionPolicy: parameters are cast for forward/backward, master weights, optimizer state and
the EMA stay fp32. Heads reduce gradients in fp32 (recipe 6.1: fp32 reduction for the DINO/iBOT heads).
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from training.config import TrainDevice, TrainPrecision
from training.cpu_allocator import keep_freed_memory

# gloo on CPU can be slow to rendezvous under load; a stuck peer should still fail within minutes.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=10)
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, slots=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh
    owns_process_group: bool
    """True when this process created the group (a plain process); `shutdown` then destroys it."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(preference: TrainDevice, local_rank: int) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is 'cuda' but CUDA is not available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(preference: TrainDevice = "auto") -> DistributedEnv:
    """Joins the torchrun group, or makes a world of one for a plain process."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    device = resolve_device(preference, local_rank)
    if device.type == "cpu":
        keep_freed_memory()  # CPU steps reuse their large buffers (see training.cpu_allocator)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns:
        if launched:
            dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
        else:
            # Why a HashStore: a world of one needs no rendezvous, and no port can collide with another run.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return DistributedEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, mesh, owns)


def shutdown(env: DistributedEnv) -> None:
    if env.owns_process_group and dist.is_initialized():
        if env.world_size > 1:
            # Why: a rank that tears its gloo pairs down while a peer still finishes its last collective
            # can abort that peer; leave together.
            dist.barrier()
        dist.destroy_process_group()


def leave_rank() -> NoReturn:
    """Ends a torchrun rank whose work is written and whose process group is destroyed, with status 0.

    Why skip interpreter finalization: objects that still hold the gloo backend (the device mesh, FSDP
    state) are torn down there, and a gloo rank has aborted at that point ("terminate called without an
    active exception", seen once in CI) after its results were already on disk. A finished rank has
    nothing left to finalize: logs and stdio are flushed here, files were closed by their writers.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def compute_dtype(precision: TrainPrecision, device: torch.device) -> torch.dtype:
    """The forward/backward dtype: as configured on CUDA, fp32 on CPU (CPU half precision is slow)."""
    return COMPUTE_DTYPES[precision] if device.type == "cuda" else torch.float32


def shard_backbone(backbone: nn.Module, mesh: DeviceMesh, dtype: torch.dtype) -> None:
    """One FSDP unit per block (all-gathered just in time), the rest (tokens, patch embed, norm) as root."""
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype)
    for block in backbone.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(backbone, mesh=mesh, mp_policy=policy)


def shard_head(head: nn.Module, mesh: DeviceMesh, dtype: torch.dtype) -> None:
    """A head is one unit; its gradients are reduced in fp32 (the prototypes' small updates)."""
    fully_shard(
        head, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    )


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds (a DTensor's local part, or the tensor itself)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def all_reduce_mean(values: dict[str, float], env: DistributedEnv) -> dict[str, float]:
    """The mean over ranks of scalar metrics (one collective for all of them)."""
    if env.world_size == 1:
        return values
    names = sorted(values)
    packed = torch.tensor([values[name] for name in names], dtype=torch.float64, device=env.device)
    dist.all_reduce(packed)
    return {name: float(value) / env.world_size for name, value in zip(names, packed.tolist(), strict=True)}
