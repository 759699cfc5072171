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
        """Sums the gradients over the processes, in buckets (one all-reduce per ~25 MB of one dtype and
        device, as DDP's reducer does): a LoRA's hundreds of small tensors one call each paid the round trip
        hundreds of times a step."""
        if self.world == 1:
            return
        import torch.distributed as dist
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        for bucket in buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            for g, summed in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(summed.view_as(g))

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch.distributed as dist
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    def any(self, flag: bool) -> bool:
        return self.sum(1.0 if flag else 0.0) > 0


BUCKET_BYTES = 25 << 20     # DDP's default bucket_cap_mb


def buckets(tensors: list, limit: int = BUCKET_BYTES) -> list:
    """`tensors` in runs of one dtype and device, each run closed once it holds `limit` bytes."""
    out, current, size = [], [], 0
    for t in tensors:
        if current and ((t.dtype, t.device) != (current[0].dtype, current[0].device) or size >= limit):
            out.append(current)
            current, size = [], 0
        current.append(t)
        size += t.numel() * t.element_size()
    return out + ([current] if current else [])
