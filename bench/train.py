"""Benchmark of training on a full-size SD1.5-shaped model with random weights (built locally) at 256 px on the
CPU: kohya's reference job (batch 1, rank 16, alpha 8, text encoder trained, AdamW fp32), with and without
gradient checkpointing and latent caching. Each configuration runs in its own process, so that its peak memory
is its own. Prints JSON: median seconds per step (steps after the first), seconds from the call to the first
step (the model already loaded, as in the webui), peak RSS; ratios between configurations of this run, and
the reference figures the issue gives for kohya's sd-scripts on the same job (not measured here).

    .venv/bin/python bench/train.py [--steps 5] [--images 16]

`--arch sdxl`: the real SDXL shapes (2.57B UNet, CLIP-L + bigG; random weights) at 256 px, kohya's usual SDXL
job (UNet only, rank 16, gradient checkpointing, cached latents), with and without cached text-encoder
outputs, and cached as a headless run holds the model (its own: the text encoders freed before the first
step); also the memory estimate against the measured peak, and the peak of the training alone (after the
model is built). About 14 GB of weights in fp32: one configuration at a time fits in 24 GB.

`--precision no,bf16`: the reference job (checkpointing on and off, cached latents) in fp32 and in bf16 autocast
(on a CPU with AMX / AVX512-BF16; the LoRA stays fp32), with the loss of each step, and ratios against fp32
measured in the same run.

`--network lora,loha,lokr,dora`: the reference job (with checkpointing and cached latents) for each network
type on the same layers (the 3x3 convolutions included, dim 16 alpha 8 everywhere), s/step, peak RSS and the
memory estimate, with ratios against LoCon (kohya's networks.lora with conv_dim) measured in the same run.

`--unet-after-encoders` (with `--arch sd1` or `sdxl`, `--rounds N`): `python -m lora_ext train` on a random-weight
fp16 checkpoint file with cached text-encoder outputs (UNet only, gradient checkpointing, cached latents, 256 px),
as it is (the UNet's weights read once the text encoders are freed) and with the UNet read first, alternating;
peak RSS, first step and wall time of each, and the ratios.

`--kohya DIR` (or $LORA_EXT_KOHYA; its venv's python from --kohya-python / $LORA_EXT_KOHYA_PYTHON, else a venv/
inside or beside it): kohya's train_network.py and `python -m lora_ext train` side by side, each from the
command line in its own process, with the same options (an fp16 SD1.5-shaped checkpoint with random weights,
regularization images, 256 px, batch 1, dim 16 alpha 8, text encoder trained, AdamW, cached latents, SDPA,
gradient checkpointing; `--both-checkpointing` also without), alternating runs (`--rounds N`), for each
`--precision` (e.g. no,bf16). Prints each tool's seconds from launch to the first finished step, median seconds
per step after it (over the later half of the run, and over the steady steps: ours caches each latent when a
step first needs it and its bar counts them, kohya's all before its first step), each gap between steps, wall
time, peak RSS and average loss, and ours over kohya's. `--ours-without-cpu-bf16`: ours as on a CPU without bf16 instructions (bf16 asked for: the frozen
weights stored in bf16, computed in fp32), kohya's as this CPU has it. `--also-ours '--frozen_weights as_stored'`: a third run in each round, ours with
those options added, and its ratios. The checkout's code is run, never copied here. Its venv as measured:
`python3.11 -m venv venv && venv/bin/pip install torch==2.14.1 torchvision==0.29.1`, then the checkout's
requirements.txt without its bitsandbytes and `-e .` lines, with torch and torchvision pinned as constraints
(`-c`), then `venv/bin/pip install --no-deps -e .` (AdamW needs no bitsandbytes).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
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
# (cache_text_encoder_outputs, the model the process's own, as `python -m lora_ext train` holds it: the cached
# text encoders are freed before the first step)
SDXL_CONFIGS = {"unet_only_te_cached": (True, False), "unet_only": (False, False),
                "unet_only_te_cached_headless": (True, True)}
_CONV = ["conv_dim=16", "conv_alpha=8"]
NETWORKS = {"lora": ("networks.lora", _CONV), "loha": ("lycoris.kohya", ["algo=loha"] + _CONV),
            "lokr": ("lycoris.kohya", ["algo=lokr"] + _CONV), "dora": ("lycoris.kohya", ["algo=locon", "dora_wd=True"] + _CONV)}


def one(name: str, steps: int, images: int, network: str | None = None, precision: str = "no") -> dict:
    from lora_ext.hosts.webui import WebuiHost
    from lora_ext import sample_data, tiny
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
    from lora_ext import sample_data, tiny
    from lora_ext.train import memory
    from lora_ext.train.config import TrainConfig
    from lora_ext.train.loop import train

    cached, headless = SDXL_CONFIGS[name]
    t0 = time.perf_counter()
    host = WebuiHost(tiny.build("sdxl-full"))
    host.disposable = headless
    build_s = time.perf_counter() - t0
    folder = tempfile.mkdtemp(prefix="lora_ext_bench_sdxl_")
    data = sample_data.make_sample_dataset(folder, size=256, per_concept=images // 2)
    cfg = TrainConfig(train_data_dir=data["train"], caption_extension=".txt", output_dir=os.path.join(folder, "out"),
                      resolution="256", train_batch_size=1, max_train_steps=steps, network_dim=16, network_alpha=8,
                      learning_rate=1e-4, network_train_unet_only=True, optimizer_type="AdamW", mixed_precision="no",
                      save_precision="fp16", gradient_checkpointing=True, cache_latents=True,
                      cache_text_encoder_outputs=cached, lr_scheduler="constant")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    _reset_peak_rss()
    est = memory.estimate(host, cfg)
    stamps = []
    start = time.perf_counter()
    train(host, cfg, on_event=lambda e: stamps.append(time.perf_counter()) if e.kind == "step" else None)
    step_times = [b - a for a, b in zip(stamps, stamps[1:])]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return {"config": name, "build_s": round(build_s, 1), "first_step_s": stamps[0] - start,
            "median_step_s": statistics.median(step_times), "step_s": step_times, "peak_rss_gb": peak,
            "training_peak_rss_gb": _peak_rss_gb(),
            "rss_after_build_gb": rss_before, "estimate_gb": est["total"] / 2 ** 30,
            "estimate_parts_gb": {k: v / 2 ** 30 for k, v in est["parts"].items()},
            "estimate_over_peak_rss": est["total"] / 2 ** 30 / peak}


def _reset_peak_rss() -> None:
    """The kernel's high-water mark of this process's RSS set to its current RSS (Linux's clear_refs 5): the
    peak of the training after it, not of building the model before."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2 ** 20


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


# --- side by side with kohya's sd-scripts ------------------------------------------------------------------

_PROGRESS = re.compile(r"(\d+)/(\d+) \[")
_MEASURED = ("first_step_s", "median_step_s", "later_half_step_s", "steady_step_s", "wall_s", "peak_rss_gb", "average_loss")
# the running average each shows in its bar: kohya's over the epoch, ours over the last 50 steps (the same here)
_BAR = {"kohya": "steps", "ours": "training"}       # the label of each tool's step bar
_LATENTS = re.compile(r"latents=(\d+/\d+)")      # ours, while latents are still being cached
_LOSS = {"kohya": re.compile(r"avr_loss=([0-9.]+)"), "ours": re.compile(r"loss=([0-9.]+)")}


def kohya_setup(args) -> tuple[str, str]:
    """(checkout, its python) from --kohya / LORA_EXT_KOHYA and --kohya-python / LORA_EXT_KOHYA_PYTHON (default:
    the venv beside or inside the checkout), or SystemExit saying what to provide."""
    folder = args.kohya or os.environ.get("LORA_EXT_KOHYA")
    if not folder or not os.path.isfile(os.path.join(folder, "train_network.py")):
        raise SystemExit(f"--kohya {folder!r}: give a checkout of kohya-ss/sd-scripts (it has train_network.py)")
    python = args.kohya_python or os.environ.get("LORA_EXT_KOHYA_PYTHON") or next(
        (p for p in (os.path.join(folder, "venv", "bin", "python"), os.path.join(folder, "..", "venv", "bin", "python"))
         if os.path.isfile(p)), None)
    if not python:
        raise SystemExit(f"no venv found for {folder}: give its python with --kohya-python")
    return os.path.abspath(folder), python


def kohya_inputs(folder: str, images: int, arch: str = "sd1") -> dict:
    """A random-weight SD1.5-shaped (`arch` sdxl: SDXL-shaped) checkpoint (fp16, as shared), a sample dataset
    with regularization images, and the CLIP tokenizer saved where kohya's --tokenizer_cache_dir finds it (it
    cannot download)."""
    from safetensors.torch import save_file

    from lora_ext.hosts.ldm_layout import clip_tokenizer
    from lora_ext import sample_data, tiny

    ckpt = os.path.join(folder, f"{'sd15' if arch == 'sd1' else arch}_random.safetensors")
    model = tiny.build(f"{arch}-full").half()
    save_file({k: v.contiguous() for k, v in model.checkpoint_state_dict().items()}, ckpt)
    del model
    data = sample_data.make_sample_dataset(os.path.join(folder, "data"), size=256, per_concept=images // 2)
    tok = clip_tokenizer()
    tok.model_max_length = 77
    tok.save_pretrained(os.path.join(folder, "tokenizers", "openai_clip-vit-large-patch14"))
    return {"checkpoint": ckpt, "data": data, "tokenizers": os.path.join(folder, "tokenizers")}


def _train_flags(inputs, out, steps, precision, gc) -> list:
    """The one command line both tools get (kohya's option names)."""
    return ["--pretrained_model_name_or_path", inputs["checkpoint"], "--train_data_dir", inputs["data"]["train"],
            "--reg_data_dir", inputs["data"]["reg"], "--output_dir", out, "--output_name", "bench",
            "--resolution", "256", "--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "8",
            "--train_batch_size", "1", "--max_train_steps", str(steps), "--learning_rate", "1e-4",
            "--optimizer_type", "AdamW", "--mixed_precision", precision, "--save_precision", "fp16",
            "--cache_latents", "--caption_extension", ".txt", "--sdpa", "--seed", "1"] + (["--gradient_checkpointing"] if gc else [])


def steady_gaps(seen: dict, latents: dict) -> list:
    """The gaps between steps (step -> seconds it finished at) that encoded no latent: the latents count a
    step's bar line shows (`latents`, step -> "k/n", None once all are cached) did not change. kohya's steps
    never encode (it caches every latent before its first step, which its first_step_s includes)."""
    steps = sorted(seen)
    return [seen[b] - seen[a] for a, b in zip(steps, steps[1:]) if latents.get(a) == latents.get(b)]


def timed_run(cmd, cwd, env, tool) -> dict:
    """Runs one training process; from its progress bar (tqdm, both tools) the time each step finished,
    from the kernel its peak RSS (this child's alone: wait4)."""
    start = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen, losses, latents, tail, buf = {}, [], {}, [], b""
    while chunk := p.stdout.read1(65536):
        buf += chunk
        *parts, buf = re.split(rb"[\r\n]", buf)
        tail = (tail + [part.decode("utf-8", "replace") for part in parts])[-30:]
        # tqdm starts each redraw with "\r": a bar drawn whole ("...]") is read now, not at the next redraw
        for part in parts + ([buf] if buf.endswith(b"]") else []):
            line = part.decode("utf-8", "replace")
            if not line.startswith(_BAR[tool]):
                continue
            for m in _PROGRESS.finditer(line):
                k = int(m.group(1))
                if k and k not in seen:
                    seen[k] = time.perf_counter() - start
                    loss, cached = _LOSS[tool].search(line), _LATENTS.search(line)
                    losses.append(float(loss.group(1)) if loss else None)
                    latents[k] = cached.group(1) if cached else None
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - start
    if status or not seen:
        raise SystemExit(f"{tool} failed ({status}):\n" + "\n".join(tail))
    stamps = [seen[k] for k in sorted(seen)]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    steady = steady_gaps(seen, latents)
    return {"first_step_s": stamps[0], "median_step_s": statistics.median(gaps),
            "later_half_step_s": statistics.median(gaps[len(gaps) // 2:]),
            "steady_step_s": statistics.median(steady) if steady else float("nan"),
            "wall_s": wall, "peak_rss_gb": usage.ru_maxrss / 2 ** 20, "average_loss": losses[-1],
            "step_s": [round(g, 3) for g in gaps]}


# ours as on a CPU without bf16 instructions, whatever this one has: bf16 asked for, the frozen weights stored in
# it and computed in fp32 (train.upcast)
_WITHOUT_CPU_BF16 = ("import sys; import lora_ext.train.optim as o; o.cpu_bf16 = lambda: None; "
                     "from lora_ext.cli import main; sys.exit(main(sys.argv[1:]))")


def _ours(args) -> list:
    if args.ours_without_cpu_bf16:
        return [sys.executable, "-c", _WITHOUT_CPU_BF16, "train"]
    return [sys.executable, "-m", "lora_ext", "train"]


def _over_kohya(med, tool) -> dict:
    k, o = med["kohya"], med[tool]
    return {"steps_per_second_ours_over_kohya": k["median_step_s"] / o["median_step_s"],
            "steady_steps_per_second_ours_over_kohya": k["steady_step_s"] / o["steady_step_s"],
            "peak_rss_ours_over_kohya": o["peak_rss_gb"] / k["peak_rss_gb"],
            "first_step_ours_over_kohya": o["first_step_s"] / k["first_step_s"],
            "wall_ours_over_kohya": o["wall_s"] / k["wall_s"],
            "average_loss_ours_over_kohya": o["average_loss"] / k["average_loss"]}


# ours with the UNet read together with the rest of the model, before the captions are encoded (what every run
# did before train.leaving.unet_after_encoders)
_UNET_FIRST = ("import sys; import lora_ext.train.leaving as l; l.unet_after_encoders = lambda cfg, device, spec: False; "
               "from lora_ext.cli import main; sys.exit(main(sys.argv[1:]))")


@contextlib.contextmanager
def _inputs(args, prefix: str):
    """(work folder, kohya_inputs made in it), the folder removed afterwards (an SDXL checkpoint is 7 GB). Made
    in a child process: a child's peak RSS (wait4) starts from its parent's at fork, and building the
    checkpoint here would have set that floor under every run's figure."""
    work = tempfile.mkdtemp(prefix=prefix)
    try:
        made = subprocess.run([sys.executable, os.path.abspath(__file__), "--make-inputs", work, "--images",
                               str(args.images), "--arch", args.arch], check=True, stdout=subprocess.PIPE, text=True)
        yield work, json.loads(made.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def compare_unet_later(args) -> dict:
    """`python -m lora_ext train` on an fp16 checkpoint file with cached text-encoder outputs (kohya's usual
    SDXL job: UNet only, gradient checkpointing, cached latents), as it is (the UNet read once the text
    encoders are freed) and with the UNet read first, alternating; peak RSS, first step, wall and their ratios."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    variants = {"unet_after_encoders": [sys.executable, "-m", "lora_ext", "train"],
                "unet_first": [sys.executable, "-c", _UNET_FIRST, "train"]}
    runs = {name: [] for name in variants}
    with _inputs(args, "lora_ext_bench_unet_later_") as (work, inputs):
        for r in range(args.rounds):
            for name, cmd in variants.items():
                flags = _train_flags(inputs, os.path.join(work, f"{name}_{r}"), args.steps, "no", True)
                runs[name].append(timed_run(cmd + flags + ["--network_train_unet_only",
                                                           "--cache_text_encoder_outputs"], ROOT, env, "ours"))
    med = {name: {k: statistics.median(run[k] for run in v) for k in _MEASURED} for name, v in runs.items()}
    late, first = med["unet_after_encoders"], med["unet_first"]
    return {"job": f"{args.arch.upper()}-shaped random weights (fp16 file), {args.images} images + regularization "
                   f"images at 256 px, batch 1, dim 16 alpha 8, UNet only, cached text-encoder outputs and latents, "
                   f"gradient checkpointing, AdamW fp32, {args.steps} steps; each run its own process",
            "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())), "runs": runs, "medians": med,
            "ratios_in_this_run": {"peak_rss_after_encoders_over_first": late["peak_rss_gb"] / first["peak_rss_gb"],
                                   "first_step_after_encoders_over_first": late["first_step_s"] / first["first_step_s"],
                                   "wall_after_encoders_over_first": late["wall_s"] / first["wall_s"],
                                   "average_loss_after_encoders_over_first": late["average_loss"] / first["average_loss"]}}


def _side_by_side(args, folder, python, work, inputs, env) -> tuple:
    """(results, ratios): each precision's (and checkpointing's) rounds, the tools alternating."""
    results, ratios = {}, {}
    for precision in [p.strip() for p in args.precision.split(",") if p.strip()]:
        for gc in (True, False) if args.both_checkpointing else (True,):
            # "no" is kohya's name for fp32
            name = f"{'fp32' if precision == 'no' else precision}_{'checkpointing' if gc else 'no_checkpointing'}"
            # "ours_also": ours with --also-ours's options added, a third run in each round
            runs = {"kohya": [], "ours": [], **({"ours_also": []} if args.also_ours else {})}
            for r in range(args.rounds):
                for tool in runs:
                    out = os.path.join(work, f"{name}_{tool}_{r}")
                    flags = _train_flags(inputs, out, args.steps, precision, gc)
                    cmd = ([python, "train_network.py"] + flags + ["--tokenizer_cache_dir", inputs["tokenizers"]]
                           if tool == "kohya" else _ours(args) + flags
                           + (args.also_ours.split() if tool == "ours_also" else []))
                    runs[tool].append(timed_run(cmd, folder if tool == "kohya" else ROOT, env, tool.split("_")[0]))
            med = {t: {k: statistics.median(run[k] for run in v) for k in _MEASURED}
                   for t, v in runs.items()}
            results[name] = {"runs": runs, "medians": med}
            ratios[name] = _over_kohya(med, "ours")
            if args.also_ours:
                ratios[f"{name}_{args.also_ours}"] = _over_kohya(med, "ours_also")
    return results, ratios


def compare_kohya(args) -> dict:
    """kohya's train_network.py and ours on the same command line, alternating (kohya, ours, kohya, ours ...)
    so that the machine's drift falls on both; ratios from the medians of each tool's rounds."""
    from lora_ext.train.optim import cpu_bf16

    if args.arch != "sd1":
        raise SystemExit("side by side with kohya: the SD1.5 job (its train_network.py); leave --arch out")
    folder, python = kohya_setup(args)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    with _inputs(args, "lora_ext_bench_kohya_") as (work, inputs):
        results, ratios = _side_by_side(args, folder, python, work, inputs, env)
    return {"job": f"SD1.5-shaped random weights (fp16 file), {args.images} images + regularization images at 256 px, "
                   f"batch 1, dim 16 alpha 8, text encoder trained, AdamW, cached latents, SDPA, {args.steps} steps; "
                   "each run its own process, started from the command line", "kohya": folder,
            "cpu_bf16": cpu_bf16(), "ours_as_without_cpu_bf16": args.ours_without_cpu_bf16, "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())),
            "results": results, "ratios_in_this_run": ratios}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, help="steps per run (default 5; side by side with kohya 6)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--arch", choices=["sd1", "sdxl"], default="sd1")
    ap.add_argument("--network", help="comma-separated network types to compare: " + ",".join(NETWORKS))
    ap.add_argument("--precision", default="no", help="mixed precisions to compare with fp32: e.g. no,bf16")
    ap.add_argument("--kohya", help="a checkout of kohya-ss/sd-scripts (or $LORA_EXT_KOHYA): run it side by side")
    ap.add_argument("--kohya-python", help="its venv's python (or $LORA_EXT_KOHYA_PYTHON; default: venv/ in or beside it)")
    ap.add_argument("--rounds", type=int, default=1, help="side by side: runs of each tool per configuration")
    ap.add_argument("--also-ours", help="side by side: also ours with these options added, e.g. "
                    "'--frozen_weights as_stored'")
    ap.add_argument("--both-checkpointing", action="store_true", help="side by side: with and without checkpointing")
    ap.add_argument("--ours-without-cpu-bf16", action="store_true",
                    help="side by side: ours as on a CPU without bf16 instructions (kohya's as this CPU has it)")
    ap.add_argument("--unet-after-encoders", action="store_true",
                    help="the headless run with cached text-encoder outputs, its UNet read after the encoders are "
                         "freed against read first (--arch sd1 or sdxl)")
    ap.add_argument("--make-inputs", help=argparse.SUPPRESS)
    ap.add_argument("--one", choices=sorted(CONFIGS) + sorted(SDXL_CONFIGS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    kohya = args.kohya or os.environ.get("LORA_EXT_KOHYA")
    if args.steps is None:
        args.steps = 6 if kohya and not args.one else 5
    if args.make_inputs:
        print(json.dumps(kohya_inputs(args.make_inputs, args.images, args.arch)))
        return
    if args.unet_after_encoders:
        print(json.dumps(compare_unet_later(args), indent=2, default=lambda v: round(v, 4)))
        return
    if args.one:
        if args.arch == "sdxl":
            print(json.dumps(one_sdxl(args.one, args.steps, args.images)))
        else:
            print(json.dumps(one(args.one, args.steps, args.images, args.network, args.precision)))
        return
    if kohya:
        print(json.dumps(compare_kohya(args), indent=2, default=lambda v: round(v, 4)))
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
                "rss_te_cached_over_not": r["unet_only_te_cached"]["peak_rss_gb"] / r["unet_only"]["peak_rss_gb"],
                "training_rss_te_freed_over_kept": (r["unet_only_te_cached_headless"]["training_peak_rss_gb"]
                                                    / r["unet_only_te_cached"]["training_peak_rss_gb"]),
                "first_step_te_freed_over_kept": (r["unet_only_te_cached_headless"]["first_step_s"]
                                                  / r["unet_only_te_cached"]["first_step_s"])},
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
