"""Data-parallel training over several processes (launched by torchrun or `accelerate launch`, which set
WORLD_SIZE / RANK / MASTER_ADDR): each process takes its slice of every global batch, gradients are summed
across processes, and only the first process writes files and reports. With every random draw tied to its
sample (see loop._loss), N processes with batch B compute what one process with batch N*B does."""
from __future__ import annotations

import os

import torch


def local_device() -> torch.device:
    """Where this process computes: its GPU (torchrun's LOCAL_RANK) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class Dist:
    def __init__(self, world: int = 1, rank: int = 0):
        self.world, self.rank = world, rank

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(local_device())
        return cls(dist.get_world_size(), dist.get_rank())

    @property
    def main(self) -> bool:
        return self.rank == 0

    def local(self, batch: list, per_process: int) -> list:
        return batch[self.rank * per_process:(self.rank + 1) * per_process]

    def sum_grads(self, params) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch.distributed as dist
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    def any(self, flag: bool) -> bool:
        return self.sum(1.0 if flag else 0.0) > 0
