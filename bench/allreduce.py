"""Benchmark of the gradient sum of a multi-process run (lora_ext/train/distributed.py): the reference job's
LoRA gradients (SD1.5, rank 32, every Linear and 1x1 target: 600 tensors) summed over 2 CPU processes with gloo, one
all-reduce per tensor (how it was done) against the buckets Dist.sum_grads makes now. Prints one JSON line:
the median seconds of each over `--rounds` sums, and per_tensor / bucketed.

    .venv/bin/python bench/allreduce.py [--rank 32] [--rounds 20]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def lora_shapes(rank: int) -> list:
    """(down, up) shapes of a rank-`rank` LoRA on every Linear / 1x1 target of the real SD1.5 shapes."""
    from lora_ext.hosts.webui import WebuiHost
    from lora_ext import tiny

    model = tiny.build("sd1-full")
    shapes = []
    for bound in WebuiHost(model).lora_targets().values():
        if len(bound.shape) == 2 or tuple(bound.shape[2:]) == (1, 1):
            shapes += [(rank, bound.shape[1]), (bound.shape[0], rank)]
    return shapes


def _worker(rank: int, world: int, port: int, shapes: list, rounds: int, queue) -> None:
    import torch.distributed as dist

    from lora_ext.train.distributed import Dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape)
    ours = Dist(world, rank)
    times = {"per_tensor": [], "bucketed": []}
    for _ in range(rounds):
        for name in times:
            dist.barrier()
            start = time.perf_counter()
            if name == "per_tensor":
                for p in params:
                    dist.all_reduce(p.grad)
            else:
                ours.sum_grads(params)
            times[name].append(time.perf_counter() - start)
    if rank == 0:
        queue.put({k: statistics.median(v) for k, v in times.items()})
    dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    import torch.multiprocessing as mp

    shapes = lora_shapes(args.rank)
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(2, free_port(), shapes, args.rounds, queue), nprocs=2, join=True)
    medians = queue.get()
    print(json.dumps({"tensors": len(shapes), "rank": args.rank, "processes": 2, "backend": "gloo",
                      "per_tensor_s": medians["per_tensor"], "bucketed_s": medians["bucketed"],
                      "per_tensor_over_bucketed": medians["per_tensor"] / medians["bucketed"]}))


if __name__ == "__main__":
    main()
