"""Benchmark of the CPU convolution rule (lora_ext/train/cpu_conv.py) on SD's frozen fp32 layer shapes.

Prints one JSON line per (dtype, layer, input size, batch): the best time of a forward and its input gradient
on oneDNN and on the dtype's GEMM kernel (fp32: torch's thnn; bf16, under autocast: unfold + matmul),
gemm / oneDNN (below 1: the GEMM faster), the rule's pick, and whether the pick was the faster kernel (or within
`--tie` of it). The last line sums, per dtype, the time the rule's picks take / oneDNN everywhere. fp32 also
times the layer stored in fp16 and cast up at use (lora_ext/train/upcast.py, what `--frozen_weights as_stored`
runs: the rule's kernel, its weight cast for forward and again for the input gradient), over the rule's pick on
fp32 weights.

    .venv/bin/python bench/cpu_conv.py [--rounds 3] [--batch 1,2] [--tie 0.1] [--dtype fp32,bf16]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lora_ext.train import cpu_conv  # noqa: E402
from lora_ext.train.upcast import upcast_patches  # noqa: E402

# (in channels, out channels, input size, kernel, stride): SD1.5 / SDXL UNet layers at 256 to 1024 px
SHAPES = [(320, 320, 64, 3, 1), (320, 320, 32, 3, 1), (640, 640, 32, 3, 1), (640, 640, 16, 3, 1),
          (1280, 1280, 32, 3, 1), (1280, 1280, 16, 3, 1), (1280, 1280, 8, 3, 1), (1280, 1280, 4, 3, 1),
          (640, 320, 32, 3, 1), (960, 320, 32, 3, 1), (1920, 640, 16, 3, 1), (2560, 1280, 8, 3, 1),
          (2560, 1280, 4, 3, 1), (320, 320, 32, 3, 2), (640, 640, 16, 3, 2), (1280, 1280, 8, 3, 2),
          (320, 640, 16, 1, 1), (2560, 1280, 8, 1, 1), (4, 320, 32, 3, 1), (320, 4, 32, 3, 1)]


def seconds(kernel, x, layer, dtype, rounds: int) -> float:
    """The best of `rounds` forward + input gradient, after one to warm up."""
    best = float("inf")
    for i in range(rounds + 1):
        probe = x.detach().requires_grad_(True)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = kernel(probe, layer, dtype)
        out.float().sum().backward()
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def _stored_fp16(layer):
    """A kernel for seconds(): `layer`'s copy stored in fp16, on train.upcast's forward."""
    (_, forward), = upcast_patches([copy.deepcopy(layer).half()])
    return lambda x, _layer, _dtype: forward(x)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", default="1,2")
    ap.add_argument("--dtype", default="fp32,bf16")
    ap.add_argument("--tie", type=float, default=0.1, help="a pick this close to the faster counts as right")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    for dtype in [{"fp32": torch.float32, "bf16": torch.bfloat16}[d] for d in args.dtype.split(",")]:
        total = {"rule": 0.0, "onednn": 0.0}
        kernels = {"onednn": cpu_conv._onednn, "gemm": cpu_conv.GEMM[dtype]}
        for ci, co, size, k, stride in SHAPES:
            layer = nn.Conv2d(ci, co, k, padding=k // 2, stride=stride).requires_grad_(False)
            for batch in map(int, args.batch.split(",")):
                x = torch.randn(batch, ci, size, size)
                t = {name: seconds(f, x, layer, dtype, args.rounds) for name, f in kernels.items()}
                pick = cpu_conv.kernel_name(x.shape, layer, dtype)
                total["rule"] += t[pick]
                total["onednn"] += t["onednn"]
                stored = {}
                if dtype == torch.float32:
                    up = seconds(_stored_fp16(layer), x, layer, dtype, args.rounds)
                    total["upcast"] = total.get("upcast", 0.0) + up
                    stored = {"stored_fp16_ms": round(up * 1e3, 2), "stored_fp16_over_rule": round(up / t[pick], 3)}
                print(json.dumps({"dtype": str(dtype).removeprefix("torch."), "in": ci, "out": co, "size": size,
                                  "kernel": k, "stride": stride, "batch": batch,
                                  "onednn_ms": round(t["onednn"] * 1e3, 2), "gemm_ms": round(t["gemm"] * 1e3, 2),
                                  "gemm_over_onednn": round(t["gemm"] / t["onednn"], 3), "rule": pick,
                                  "rule_right": t[pick] <= (1 + args.tie) * min(t.values()), **stored}), flush=True)
        print(json.dumps({"dtype": str(dtype).removeprefix("torch."),
                          "rule_over_onednn_total": round(total["rule"] / total["onednn"], 3),
                          **({"stored_fp16_over_rule_total": round(total["upcast"] / total["rule"], 3)}
                             if "upcast" in total else {}),
                          "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
