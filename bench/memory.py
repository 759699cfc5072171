"""Benchmark of the training memory estimate (lora_ext/train/memory.py) against what one training step really
allocates, on a full-size SD1.5-shaped model with random weights at 256 px on the CPU (fp32), with and without
gradient checkpointing. The step (UNet forward with the LoRA attached, backward, AdamW step) runs twice; the
second, in steady state, is measured with torch's profiler (its CPU allocator records). Prints JSON: the
estimate's activations + gradients, the measured peak above what was allocated before the step (weights, LoRA,
optimizer state), their ratio (>1: the estimate is on the safe side), and the seconds the estimate took.
    .venv/bin/python bench/memory.py [--size 256] [--dim 16]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lora_ext.hosts.conditioning import Cond  # noqa: E402
from lora_ext.hosts.ldm_attention import sdpa_patches  # noqa: E402
from lora_ext.hosts.webui import WebuiHost  # noqa: E402
from lora_ext import tiny  # noqa: E402
from lora_ext.train import memory  # noqa: E402
from lora_ext.train.config import TrainConfig  # noqa: E402
from lora_ext.train.network import network_for  # noqa: E402
from lora_ext.train.network_args import spec  # noqa: E402
from lora_ext.train.session import HostSession  # noqa: E402


def measured_peak(host, cfg) -> int:
    """Peak bytes allocated during a steady-state step, above what was allocated when it began."""
    network = network_for(host, spec(cfg))
    optimizer = torch.optim.AdamW(network.parameters())
    w, h = cfg.size
    b = cfg.train_batch_size
    x, t = torch.randn(b, 4, h // 8, w // 8), torch.zeros(b, dtype=torch.long)
    cond = Cond(torch.randn(b, 77, memory._context_width(host)))

    def step():
        host.predict(x, t, cond).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    blocks = host.checkpoint_blocks() if cfg.gradient_checkpointing else ()
    with HostSession(host.model, blocks, sdpa_patches(host.unet)):
        network.attach()
        try:
            step()                  # the optimizer's state exists from here on, as in a run
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
                step()
        finally:
            network.detach()
    running = peak = 0
    for e in sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
        running += e.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--dim", type=int, default=16)
    args = ap.parse_args()
    host = WebuiHost(tiny.build("sd1-full"))
    out = {"model": "sd1-full (SD1.5 shapes, random weights), fp32 on the CPU", "size": args.size, "dim": args.dim}
    for gc in (False, True):
        cfg = TrainConfig(resolution=str(args.size), network_dim=args.dim, train_batch_size=1, mixed_precision="no",
                          text_encoder_lr=0.0, gradient_checkpointing=gc)
        started = time.perf_counter()
        est = memory.estimate(host, cfg)
        seconds = time.perf_counter() - started
        predicted = est["parts"]["activations"] + est["parts"]["gradients"]
        peak = measured_peak(host, cfg)
        out["checkpointing" if gc else "no_checkpointing"] = {
            "estimate_activations_plus_gradients_bytes": predicted, "measured_peak_bytes": peak,
            "estimate_over_measured": predicted / peak, "estimate_seconds": seconds,
            "estimate_total_bytes": est["total"]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
