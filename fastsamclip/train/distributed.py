"""Data parallelism by hand: torchrun's environment, the process group, one all-reduce.

Stage 2 runs two backward passes over different parameter subsets per step, so gradients are
all-reduced once after both (what DDP's ``no_sync`` + ``find_unused_parameters`` would do), which
also keeps activation checkpointing and ``torch.compile`` free of DDP hooks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_pref: str = "auto") -> Tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; with WORLD_SIZE > 1 join the process group.

    The same command runs on one process (no env) or under ``torchrun --nproc-per-node N``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref.startswith("cuda")
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu") if device_pref in ("auto", "cuda") else torch.device(device_pref)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


def all_reduce_sum_(tensors: List[torch.Tensor], d: Dist) -> None:
    """Sum ``tensors`` (of one dtype) in place over the ranks (one flat all-reduce); a no-op on one process."""
    if not d.enabled or not tensors:
        return
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat)
    for t, r in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.copy_(r)


def all_reduce_mean_(tensors: List[torch.Tensor], d: Dist) -> None:
    """Average ``tensors`` in place over the ranks; a no-op on one process."""
    if not d.enabled or not tensors:
        return
    all_reduce_sum_(tensors, d)
    for t in tensors:
        t /= d.world_size

