"""Benchmark of training on a full-size SD1.5-shaped model with random weights (built locally) at 256 px on the
CPU: kohya's reference job (batch 1, rank 16, alpha 8, text encoder trained, AdamW fp32), with and without
gradient checkpointing and latent caching. Each configuration runs in its own process, so that its peak memory
is its own. Prints JSON: median seconds per step (steps after the first), seconds from the call to the first
step (the model already loaded, as in the webui), peak RSS; ratios between configurations of this run, and
the reference figures the issue gives for kohya's sd-scripts on the same job (not measured here).

    .venv/bin/python bench/train.py [--steps 5] [--images 16]

`--arch sdxl`: the real SDXL shapes (2.57B UNet, CLIP-L + bigG; random weights) at 256 px, kohya's usual SDXL
job (UNet only, rank 16, gradient checkpointing, cached latents), with and without cached text-encoder
outputs; also the memory estimate against the measured peak. About 14 GB of weights in fp32: one
configuration at a time fits in 24 GB.

`--precision no,bf16`: the reference job (checkpointing on and off, cached latents) in fp32 and in bf16 autocast
(on a CPU with AMX / AVX512-BF16; the LoRA stays fp32), with the loss of each step, and ratios against fp32
measured in the same run.

`--network lora,loha,lokr,dora`: the reference job (with checkpointing and cached latents) for each network
type on the same layers (the 3x3 convolutions included, dim 16 alpha 8 everywhere), s/step, peak RSS and the
memory estimate, with ratios against LoCon (kohya's networks.lora with conv_dim) measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

KOHYA_REFERENCE = {"step_s_with_checkpointing": 7.0, "step_s_without": 5.1, "peak_rss_gb": 7.3,
                   "launch_to_first_step_s": 58.0}
CONFIGS = {"gc_cache": (True, True), "gc_nocache": (True, False), "nogc_cache": (False, True),
           "nogc_nocache": (False, False)}
SDXL_CONFIGS = {"unet_only_te_cached": True, "unet_only": False}     # cache_text_encoder_outputs
_CONV = ["conv_dim=16", "conv_alpha=8"]
NETWORKS = {"lora": ("networks.lora", _CONV), "loha": ("lycoris.kohya", ["algo=loha"] + _CONV),
            "lokr": ("lycoris.kohya", ["algo=lokr"] + _CONV), "dora": ("lycoris.kohya", ["algo=locon", "dora_wd=True"] + _CONV)}


def one(name: str, steps: int, images: int, network: str | None = None, precision: str = "no") -> dict:
    from lora_ext.hosts.webui import WebuiHost
    from lora_ext.testing import sample_data, tiny
    from lora_ext.train import memory
    from lora_ext.train.config import TrainConfig
    from lora_ext.train.loop import train

    gc_on, cache = CONFIGS[name]
    module, args = NETWORKS[network] if network else ("networks.lora", [])
    t0 = time.perf_counter()
    host = WebuiHost(tiny.build("sd1-full"))
    build_s = time.perf_counter() - t0
    folder = tempfile.mkdtemp(prefix="lora_ext_bench_train_")
    data = sample_data.make_sample_dataset(folder, size=256, per_concept=images // 2)
    cfg = TrainConfig(train_data_dir=data["train"], caption_extension=".txt", output_dir=os.path.join(folder, "out"),
                      resolution="256",
                      train_batch_size=1, max_train_steps=steps, network_dim=16, network_alpha=8,
                      learning_rate=1e-4, unet_lr=1e-4, text_encoder_lr=5e-5, optimizer_type="AdamW",
                      mixed_precision=precision, save_precision="fp16", gradient_checkpointing=gc_on, cache_latents=cache,
                      lr_scheduler="constant", network_module=module, network_args=args, seed=1)
    est = memory.estimate(host, cfg)
    stamps = []
    start = time.perf_counter()
    result = train(host, cfg, on_event=lambda e: stamps.append(time.perf_counter()) if e.kind == "step" else None)
    step_times = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"config": name, "gradient_checkpointing": gc_on, "cache_latents": cache, "build_s": round(build_s, 1),
            "precision": precision, "losses": result.losses, "messages": result.messages,
            "first_step_s": stamps[0] - start, "median_step_s": statistics.median(step_times),
            "step_s": step_times, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "network": network or "lora", "estimate_gb": est["total"] / 2 ** 30,
            "network_parameters": est["lora_parameters"]}


def one_sdxl(name: str, steps: int, images: int) -> dict:
    from lora_ext.hosts.webui import WebuiHost
    from lora_ext.testing import sample_data, tiny
    from lora_ext.train import memory
    from lora_ext.train.config import TrainConfig
    from lora_ext.train.loop import train

    t0 = time.perf_counter()
    host = WebuiHost(tiny.build("sdxl-full"))
    build_s = time.perf_counter() - t0
    folder = tempfile.mkdtemp(prefix="lora_ext_bench_sdxl_")
    data = sample_data.make_sample_dataset(folder, size=256, per_concept=images // 2)
    cfg = TrainConfig(train_data_dir=data["train"], caption_extension=".txt", output_dir=os.path.join(folder, "out"),
                      resolution="256", train_batch_size=1, max_train_steps=steps, network_dim=16, network_alpha=8,
                      learning_rate=1e-4, network_train_unet_only=True, optimizer_type="AdamW", mixed_precision="no",
                      save_precision="fp16", gradient_checkpointing=True, cache_latents=True,
                      cache_text_encoder_outputs=SDXL_CONFIGS[name], lr_scheduler="constant")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    est = memory.estimate(host, cfg)
    stamps = []
    start = time.perf_counter()
    train(host, cfg, on_event=lambda e: stamps.append(time.perf_counter()) if e.kind == "step" else None)
    step_times = [b - a for a, b in zip(stamps, stamps[1:])]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return {"config": name, "build_s": round(build_s, 1), "first_step_s": stamps[0] - start,
            "median_step_s": statistics.median(step_times), "step_s": step_times, "peak_rss_gb": peak,
            "rss_after_build_gb": rss_before, "estimate_gb": est["total"] / 2 ** 30,
            "estimate_parts_gb": {k: v / 2 ** 30 for k, v in est["parts"].items()},
            "estimate_over_peak_rss": est["total"] / 2 ** 30 / peak}


def _run_each(configs, args, network=None, precision="no") -> dict:
    results = {}
    for name in configs:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--images",
                              str(args.images), "--arch", args.arch, "--precision", precision]
                             + (["--network", network] if network else []),
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            raise SystemExit(out.stderr)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def compare_networks(args) -> dict:
    names = [n.strip() for n in args.network.split(",") if n.strip()]
    unknown = [n for n in names if n not in NETWORKS]
    if unknown:
        raise SystemExit(f"--network: unknown {', '.join(unknown)} (known: {', '.join(NETWORKS)})")
    if "lora" not in names:
        names.insert(0, "lora")         # the baseline, measured in the same run
    r = {n: _run_each(["gc_cache"], args, n)["gc_cache"] for n in names}
    base = r["lora"]
    return {"job": "SD1.5-shaped random weights, 256 px, batch 1, dim 16 alpha 8 (convolutions too), text encoder "
                   "trained, gradient checkpointing, cached latents, AdamW fp32, CPU",
            "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())), "results": r,
            "ratios_against_locon_in_this_run": {
                n: {"step": r[n]["median_step_s"] / base["median_step_s"],
                    "peak_rss": r[n]["peak_rss_gb"] / base["peak_rss_gb"],
                    "parameters": r[n]["network_parameters"] / base["network_parameters"],
                    "estimate_over_peak_rss": r[n]["estimate_gb"] / r[n]["peak_rss_gb"]} for n in names}}


def compare_precisions(args) -> dict:
    """fp32 and the other precisions, checkpointing on and off, alternating (fp32, bf16, fp32, bf16 ...)."""
    from lora_ext.train.optim import cpu_bf16

    names = [n.strip() for n in args.precision.split(",") if n.strip()]
    if "no" not in names:
        names.insert(0, "no")
    r = {}
    for config in ("gc_cache", "nogc_cache"):
        for n in names:
            r[f"{config}_{n}"] = _run_each([config], args, precision=n)[config]
    ratios = {}
    for config in ("gc_cache", "nogc_cache"):
        base = r[f"{config}_no"]
        for n in names[1:]:
            x = r[f"{config}_{n}"]
            ratios[f"{config}_{n}"] = {"step": x["median_step_s"] / base["median_step_s"],
                                      "steps_per_second": base["median_step_s"] / x["median_step_s"],
                                      "peak_rss": x["peak_rss_gb"] / base["peak_rss_gb"],
                                      "first_step": x["first_step_s"] / base["first_step_s"],
                                      "loss_last_over_fp32": x["losses"][-1] / base["losses"][-1]}
    return {"job": "SD1.5-shaped random weights, 256 px, batch 1, rank 16 alpha 8, text encoder trained, cached latents, "
                   "AdamW, CPU", "cpu_bf16": cpu_bf16(), "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())),
            "results": r, "ratios_against_fp32_in_this_run": ratios}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--arch", choices=["sd1", "sdxl"], default="sd1")
    ap.add_argument("--network", help="comma-separated network types to compare: " + ",".join(NETWORKS))
    ap.add_argument("--precision", default="no", help="mixed precisions to compare with fp32: e.g. no,bf16")
    ap.add_argument("--one", choices=sorted(CONFIGS) + sorted(SDXL_CONFIGS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        if args.arch == "sdxl":
            print(json.dumps(one_sdxl(args.one, args.steps, args.images)))
        else:
            print(json.dumps(one(args.one, args.steps, args.images, args.network, args.precision)))
        return
    if args.precision != "no":
        print(json.dumps(compare_precisions(args), indent=2, default=lambda v: round(v, 4)))
        return
    if args.network:
        print(json.dumps(compare_networks(args), indent=2, default=lambda v: round(v, 3)))
        return
    if args.arch == "sdxl":
        r = _run_each(SDXL_CONFIGS, args)
        print(json.dumps({
            "job": "SDXL-shaped random weights, 256 px, batch 1, rank 16 alpha 8, UNet only, gradient checkpointing, "
                   "cached latents, AdamW fp32, CPU",
            "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())), "results": r,
            "ratios_in_this_run": {
                "step_te_cached_over_not": r["unet_only_te_cached"]["median_step_s"] / r["unet_only"]["median_step_s"],
                "rss_te_cached_over_not": r["unet_only_te_cached"]["peak_rss_gb"] / r["unet_only"]["peak_rss_gb"]},
        }, indent=2, default=lambda v: round(v, 3)))
        return
    results = _run_each(CONFIGS, args)
    r = results
    summary = {
        "job": "SD1.5-shaped random weights, 256 px, batch 1, rank 16 alpha 8, text encoder trained, AdamW fp32, CPU",
        "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())),
        "results": results,
        "ratios_in_this_run": {
            "step_gc_over_nogc": r["gc_cache"]["median_step_s"] / r["nogc_cache"]["median_step_s"],
            "rss_gc_over_nogc": r["gc_cache"]["peak_rss_gb"] / r["nogc_cache"]["peak_rss_gb"],
            "step_cache_over_nocache": r["gc_cache"]["median_step_s"] / r["gc_nocache"]["median_step_s"],
        },
        "kohya_reference_not_measured_here": KOHYA_REFERENCE,
        "speedup_vs_reference": {
            "with_checkpointing": KOHYA_REFERENCE["step_s_with_checkpointing"] / r["gc_cache"]["median_step_s"],
            "without": KOHYA_REFERENCE["step_s_without"] / r["nogc_cache"]["median_step_s"],
        },
        "memory_vs_reference": {k: r[k]["peak_rss_gb"] / KOHYA_REFERENCE["peak_rss_gb"] for k in ("gc_cache", "nogc_cache")},
        "first_step_vs_reference_launch": r["gc_cache"]["first_step_s"] / KOHYA_REFERENCE["launch_to_first_step_s"],
    }
    print(json.dumps(summary, indent=2, default=lambda v: round(v, 3)))


if __name__ == "__main__":
    main()
