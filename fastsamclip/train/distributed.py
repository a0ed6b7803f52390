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
    local_world_size: int = 1  # ranks on this node (they share its CPUs)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_pref: str = "auto") -> Tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK/LOCAL_WORLD_SIZE; with WORLD_SIZE > 1 join the
    process group (its rendezvous: MASTER_ADDR/MASTER_PORT, set by torchrun on every node).

    The same command runs on one process (no env), under ``torchrun --nproc-per-node N``, or on
    several nodes (``torchrun --nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT``)."""
    d = dist_from_env()
    world, local = d.world_size, d.local_rank
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref.startswith("cuda")
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu") if device_pref in ("auto", "cuda") else torch.device(device_pref)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return d, device


def dist_from_env() -> Dist:
    """This process's place among torchrun's processes (one process without torchrun), without
    joining a process group."""
    env = os.environ
    return Dist(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")),
                int(env.get("LOCAL_WORLD_SIZE", "1")))


def barrier(d: Dist) -> None:
    """Wait for every rank; a no-op on one process (or without a process group)."""
    if d.enabled and dist.is_initialized():
        dist.barrier()


def broadcast_index(value: int, d: Dist, device: torch.device) -> int:
    """Rank 0's ``value`` on every rank (a choice all ranks must share); ``value`` on one process."""
    if not d.enabled or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, 0)
    return int(t.item())


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

