"""The CUDA figures of training (issue 14), for a session lent a GPU: one process builds a full-size
SD1.5-shaped model with random weights, held in fp16 on the GPU as the webui holds it, and trains the issue's
job on it (512 px, batch 1, rank 32 alpha 16, text encoder trained, AdamW, cached latents, fp16 autocast,
gradient checkpointing), then the same job with each lever changed: every block recomputed (kohya's
checkpointing) or none, bf16, torch's SDPA off (ldm's own attention), cudnn.benchmark on, and fp32 (the model
cast to fp32 last). Each run: seconds to its first step, median seconds per step after it, the peak of
torch.cuda.max_memory_allocated (the weights included: the issue's "under 4 GB"), the memory estimate the
Train tab shows and its ratio to that peak, the losses, and whether the model's weights came back bit-exact;
a lever that fails gets its error instead, and the others run. Prints JSON, and where OUT is set writes it to
$OUT/cuda.json after every lever ("complete": false until the last), so a call cut off at its time limit
keeps what it measured.

    python3 bench/cuda.py [--steps 30] [--images 8] [--levers fp16,all_recomputed,...]

On the workplace's GPU machines (Python 3.12, their own torch, transformers 5 and no ldm) the packages it
needs travel as wheels: made here once by `bash bench/cuda_wheels.sh` into `.whl/` (ignored by git), then one
call of the device tool with `.whl` carried:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \\
      && PYTHONPATH=/tmp/site:. python3 bench/cuda.py

`--device cpu --arch sd1 --size 64 --steps 2` runs the same code on the tiny model (tests/test_bench.py)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name: (options over the base job, a lever outside the options)
LEVERS = {
    "fp16": ({}, None),
    "all_recomputed": ({"checkpointing_margin": 0.0}, None),
    "no_checkpointing": ({"gradient_checkpointing": False}, None),
    "bf16": ({"mixed_precision": "bf16"}, None),
    "no_sdpa": ({}, "no_sdpa"),
    "cudnn_benchmark": ({}, "cudnn_benchmark"),
    "fp32": ({"mixed_precision": "no"}, "fp32_model"),       # last: it casts the model to fp32
}


def _config(data: dict, out: str, args, options: dict):
    from lora_ext.train.config import TrainConfig

    base = dict(train_data_dir=data["train"], reg_data_dir=data["reg"], caption_extension=".txt", output_dir=out,
                resolution=str(args.size), train_batch_size=1, max_train_steps=args.steps, network_dim=32,
                network_alpha=16, learning_rate=1e-4, optimizer_type="AdamW", mixed_precision="fp16",
                save_precision="fp16", gradient_checkpointing=True, cache_latents=True, seed=1)
    return TrainConfig(**{**base, **options})


def _fingerprint(model) -> dict:
    """The model's tensors and where they live, copied to CPU memory (a copy on the GPU would count in the
    peak measured)."""
    return {k: (v.device, v.detach().to("cpu", copy=True)) for k, v in model.state_dict().items()}


def _same(model, before: dict) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(
        after[k].device == device and after[k].dtype == v.dtype and torch.equal(after[k].cpu(), v)
        for k, (device, v) in before.items())


def _peak(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _lever_on(host, lever: str | None) -> dict:
    """Sets a lever that is no option; returns what to put back."""
    if lever == "no_sdpa":
        host.training_patches = lambda: []
    elif lever == "cudnn_benchmark":
        saved = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        return {"cudnn_benchmark": saved}
    elif lever == "fp32_model":
        host.model.float()
    return {}


def _lever_off(host, lever: str | None, saved: dict) -> None:
    if lever == "no_sdpa":
        del host.training_patches
    elif lever == "cudnn_benchmark":
        torch.backends.cudnn.benchmark = saved["cudnn_benchmark"]


def one(host, data: dict, work: str, args, name: str) -> dict:
    """One run of the job with lever `name`: its times, peak, estimate and whether the model came back."""
    from lora_ext.train import memory
    from lora_ext.train.loop import train

    options, lever = LEVERS[name]
    saved = _lever_on(host, lever)
    try:
        cfg = _config(data, os.path.join(work, name), args, options)
        device = next(host.unet.parameters()).device
        est = memory.estimate(host, cfg)
        before = _fingerprint(host.model)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        stamps, start = [], time.perf_counter()
        result = train(host, cfg, on_event=lambda e: stamps.append(time.perf_counter()) if e.kind == "step" else None,
                       estimate=est)
        peak = _peak(device)
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        return {"first_step_s": stamps[0] - start, "median_step_s": statistics.median(gaps) if gaps else None,
                "peak_allocated_gb": None if peak is None else peak / 2 ** 30,
                "estimate_gb": est["total"] / 2 ** 30, "estimate_over_peak": None if peak is None else est["total"] / peak,
                "losses": result.losses, "messages": result.messages, "weights_back_bit_exact": _same(host.model, before)}
    finally:
        _lever_off(host, lever, saved)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--arch", default="sd1-full", help="the model: sd1-full (SD1.5 shapes) or a tiny one (sd1)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--levers", default=",".join(LEVERS), help="comma-separated, of: " + ",".join(LEVERS))
    args = ap.parse_args()
    names = [n.strip() for n in args.levers.split(",") if n.strip()]
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        raise SystemExit(f"--levers: unknown {', '.join(unknown)} (known: {', '.join(LEVERS)})")
    names.sort(key=list(LEVERS).index)          # fp32 last: it casts the model
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here (--device cpu runs the tiny model on the CPU)")

    from lora_ext.hosts.webui import WebuiHost
    from lora_ext import sample_data, tiny

    started = time.perf_counter()
    model = tiny.build(args.arch)
    host = WebuiHost((model.half() if device.type == "cuda" else model).to(device))
    work = tempfile.mkdtemp(prefix="lora_ext_bench_cuda_")
    data = sample_data.make_sample_dataset(os.path.join(work, "data"), size=args.size, per_concept=args.images // 2)
    out = {"job": f"{args.arch}, random weights, held in {next(host.unet.parameters()).dtype} on {device}; "
                  f"{args.images} images + regularization images at {args.size} px, batch 1, rank 32 alpha 16, text "
                  f"encoder trained, AdamW, cached latents, {args.steps} steps",
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "build_s": time.perf_counter() - started, "runs": {}}
    for name in names:
        try:
            out["runs"][name] = one(host, data, work, args, name)
        except Exception as e:      # one lever's failure (out of memory, say) costs no other's figures
            out["runs"][name] = {"error": f"{type(e).__name__}: {e}"}
        _write(out, final=False)    # what is measured so far survives a call cut off at its time limit
    out.update(_ratios(out["runs"]))
    print(_write(out, final=True))


def _ratios(runs: dict) -> dict:
    """Each lever against the fp16 job, and whether that job stays under the issue's 4 GB."""
    base = runs.get("fp16", {})
    if not base.get("median_step_s"):
        return {}
    peak = base["peak_allocated_gb"]
    return {"ratios_against_fp16": {
                n: {"steps_per_second": base["median_step_s"] / r["median_step_s"],
                    "peak": r["peak_allocated_gb"] / peak if peak else None}
                for n, r in runs.items() if n != "fp16" and r.get("median_step_s")},
            "fp16_peak_under_4gb": peak < 4 if peak else None}


def _write(out: dict, final: bool) -> str:
    text = json.dumps({**out, "complete": final}, indent=2, default=lambda v: round(v, 4))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "cuda.json"), "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()
