"""Benchmark of baking a LoRA into a full-size SD1.5-shaped checkpoint (random weights, built locally, ~2 GB
in fp16) with a rank-32 LoRA. The merge runs in its own process: wall time, peak RSS, and the memory it
added over that process's own start-up (torch imported), as a multiple of the largest single tensor. JSON.
For scale, the issue reports kohya's merge_lora.py at about 32 s and 9.4 GB peak for this job on two cores
(not measured here).

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
KOHYA_REFERENCE = {"seconds": 32.0, "peak_rss_gb": 9.4}


def _status(field: str) -> int:
    # VmHWM (peak) and VmRSS of this process's own address space: unlike ru_maxrss, they start afresh at
    # exec, so the parent's size (it built a 2 GB checkpoint) does not leak into the child's figures
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(base: str, lora: str, out: str) -> None:
    import torch  # noqa: F401  (the start-up cost every process pays, measured before the merge)

    from lora_ext.merge import Item, merge_checkpoint

    start_rss = _status("VmHWM")
    t = time.perf_counter()
    report = merge_checkpoint(base, [Item(lora, 1.0, 1.0)], out, precision="fp16")
    seconds = time.perf_counter() - t
    peak = _status("VmHWM")
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak, "start_rss_bytes": start_rss,
                      "merged_tensors": report["merged_tensors"], "tensors": report["tensors"]}))


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
        return
    import torch
    from safetensors.torch import save_file

    from lora_ext import files
    from lora_ext.demo import make_random_lora
    from lora_ext.testing import tiny

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
    del model, sd
    out = subprocess.run([sys.executable, __file__, "--child", base, lora, os.path.join(folder, "merged.safetensors")],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(out.stderr)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    added = r["peak_rss_bytes"] - r["start_rss_bytes"]
    result = {
        "base_bytes": os.path.getsize(base), "lora_bytes": os.path.getsize(lora), "largest_tensor_bytes": largest,
        **r, "added_bytes": added, "added_over_largest_tensor": added / largest,
        "added_over_largest_tensor_in_fp32": added / largest_fp32,
        "kohya_reference_not_measured_here": KOHYA_REFERENCE,
        "seconds_over_reference": r["seconds"] / KOHYA_REFERENCE["seconds"],
        "peak_over_reference": r["peak_rss_bytes"] / (KOHYA_REFERENCE["peak_rss_gb"] * 2 ** 30),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
