"""Data-parallel training under torchrun: `torchrun --nproc_per_node 2 -m vitkit.cli train ...`.

Each process takes an equal slice of every global batch; DistributedDataParallel averages the
gradients, so the step equals the single-process step on the whole batch. Only rank 0 writes the
run directory, logs and evaluates. On a CPU, two one-thread processes can beat one two-thread
process on small models, where a single step cannot keep both cores busy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all processes."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast_parameters(self, params) -> None:
        """Every process takes rank 0's values of `params` (what DDP does for the model's own at construction)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for param in params:
                dist.broadcast(param.data, src=0)

    def average_gradients(self, params) -> None:
        """Average the gradients of `params` over all processes (what DDP does for the model's own)."""
        if not self.enabled:
            return
        for param in params:
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= self.world_size

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's value of `flag` on every process."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)])
        dist.broadcast(t, src=0)
        return bool(t.item())


def setup(device: torch.device) -> Distributed:
    """Join the process group torchrun describes in the environment; a no-op for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size())


def local_device(device: torch.device) -> torch.device:
    """On CUDA each process takes the GPU of its local rank."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def teardown(ctx: Distributed) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
