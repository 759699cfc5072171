"""Benchmark of LoRA/checkpoint operations on a full-size SD1.5-shaped checkpoint (random weights, built
locally, ~2 GB in fp16): merging a rank-32 LoRA into it, resizing a rank-16 LoRA to rank 8, extracting a
rank-16 LoRA from (base, base + merged LoRA). Each runs in its own process: wall time, peak RSS, and the memory
it added over that process's own start-up (torch imported), for the merge as a multiple of the largest
single tensor. JSON. For scale, the issue reports kohya's tools on two cores at: merge 32 s / 9.4 GB,
resize 92 s, extract 129 s / 11.5 GB (not measured here).

    .venv/bin/python bench/merge.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
KOHYA_REFERENCE = {"merge_s": 32.0, "merge_peak_gb": 9.4, "resize_s": 92.0, "extract_s": 129.0,
                   "extract_peak_gb": 11.5}


def _status(field: str) -> int:
    # VmHWM (peak) and VmRSS of this process's own address space: unlike ru_maxrss, they start afresh at
    # exec, so the parent's size (it built a 2 GB checkpoint) does not leak into the child's figures
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(job: str, a: str, b: str, out: str) -> None:
    import torch  # noqa: F401  (the start-up cost every process pays, measured before the job)

    from lora_ext import files
    from lora_ext.tools import lowrank
    from lora_ext.merge import Item, merge_checkpoint
    from lora_ext.tools.extract import extract

    start_rss = _status("VmHWM")
    t = time.perf_counter()
    extra = {}
    if job == "merge":
        report = merge_checkpoint(a, [Item(b, 1.0, 1.0)], out, precision="fp16")
        extra = {"merged_tensors": report["merged_tensors"], "tensors": report["tensors"]}
    elif job == "resize":
        modules, kept = lowrank.resize(files.read(a).modules, rank=8)
        files.write_kohya(out, files.kohya_tensors(modules, torch.float16), {}, overwrite=True)
        extra = {"modules": len(modules), "min_kept_energy": min(kept.values())}
    else:
        modules, kept, _ = extract(a, b, rank=16)
        files.write_kohya(out, files.kohya_tensors(modules, torch.float16), {}, overwrite=True)
        extra = {"modules": len(modules), "min_kept_energy": min(kept.values())}
    seconds = time.perf_counter() - t
    peak = _status("VmHWM")
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak, "start_rss_bytes": start_rss, **extra}))


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
        return
    import torch
    from safetensors.torch import save_file

    from lora_ext import files
    from random_networks import make_random_lora
    from lora_ext import tiny

    folder = tempfile.mkdtemp(prefix="lora_ext_bench_merge_")
    model = tiny.build("sd1-full")
    sd = {k: v.half().contiguous() for k, v in model.checkpoint_state_dict().items()}
    largest = max(v.numel() * v.element_size() for v in sd.values())
    largest_fp32 = max(v.numel() * 4 for v in sd.values())
    base = os.path.join(folder, "base.safetensors")
    save_file(sd, base)
    lora = os.path.join(folder, "rank32.safetensors")
    files.write_kohya(lora, files.kohya_tensors(make_random_lora(model, rank=32, alpha=16, conv_rank=None),
                                                torch.float16), {"ss_network_dim": 32})
    lora16 = os.path.join(folder, "rank16.safetensors")
    files.write_kohya(lora16, files.kohya_tensors(make_random_lora(model, rank=16, alpha=8, conv_rank=None, seed=1),
                                                  torch.float16), {"ss_network_dim": 16})
    del model, sd
    merged = os.path.join(folder, "merged.safetensors")

    def run(job, a, b, out):
        p = subprocess.run([sys.executable, __file__, "--child", job, a, b, out], capture_output=True, text=True, cwd=ROOT)
        if p.returncode:
            raise SystemExit(p.stderr)
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r["added_bytes"] = r["peak_rss_bytes"] - r["start_rss_bytes"]
        return r

    m = run("merge", base, lora, merged)
    r = run("resize", lora16, "-", os.path.join(folder, "rank8.safetensors"))
    x = run("extract", base, merged, os.path.join(folder, "extracted.safetensors"))
    gb = 2 ** 30
    result = {
        "base_bytes": os.path.getsize(base), "lora_bytes": os.path.getsize(lora), "largest_tensor_bytes": largest,
        "merge": {**m, "added_over_largest_tensor": m["added_bytes"] / largest,
                  "added_over_largest_tensor_in_fp32": m["added_bytes"] / largest_fp32},
        "resize_rank16_to_8": r, "extract_rank16": x,
        "kohya_reference_not_measured_here": KOHYA_REFERENCE,
        "ratios_to_reference": {
            "merge_time": m["seconds"] / KOHYA_REFERENCE["merge_s"],
            "merge_peak": m["peak_rss_bytes"] / (KOHYA_REFERENCE["merge_peak_gb"] * gb),
            "resize_time": r["seconds"] / KOHYA_REFERENCE["resize_s"],
            "extract_time": x["seconds"] / KOHYA_REFERENCE["extract_s"],
            "extract_peak": x["peak_rss_bytes"] / (KOHYA_REFERENCE["extract_peak_gb"] * gb),
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
