"""Benchmark of the apply engine on a full-size SD1.5-shaped model with random weights (built locally).

Prints JSON. Every ratio is against a baseline measured in the same run:
- per-step UNet time with the LoRA active / without it (target: <= 1.02 in merge mode);
- weight change / floor, the floor being one read and one write of the touched weights (a copy);
- each of our times / the same job done the way the webui's built-in does it (weights backed up on the CPU,
  delta formed as a separate tensor, added in the weight's dtype), re-implemented here for the comparison.

    .venv/bin/python bench/apply.py [--rank 32] [--size 256] [--rounds 3]
    .venv/bin/python bench/apply.py --network loha,lokr,ia3,oft,boft,glora,full,norm,dora   (each type against LoCon)
    .venv/bin/python bench/apply.py --panel [--size 512]    (block weights, masks and step ranges against plain slots)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from lora_ext import files  # noqa: E402
from lora_ext.apply import Engine, Request  # noqa: E402
from random_networks import make_random_lora  # noqa: E402
from lora_ext.hosts.webui import WebuiHost  # noqa: E402
from lora_ext import tiny  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn) -> float:
    gc.collect()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def unet_step_times(model, size: int, rounds: int, engine, host, requests, mode) -> dict:
    """Median UNet forward time without and with the LoRA. Rounds alternate the two states to share the
    machine's noise; in each, the first step after the switch is timed apart (a generation runs 20+ steps
    per application, and that first step pays the memory the application just touched)."""
    unet = model.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, size // 8, size // 8, generator=g)
    ctx = torch.randn(1, 77, 768, generator=g)
    t = torch.tensor([500])
    off, on, first_on = [], [], []
    step = lambda: unet(x, t, context=ctx)  # noqa: E731
    with torch.no_grad():
        step()
        for _ in range(rounds):
            engine.restore(host)
            step()
            off += [timed(step) for _ in range(2)]
            engine.apply(host, requests, mode=mode)
            first_on.append(timed(step))
            on += [timed(step) for _ in range(2)]
    engine.restore(host)
    m_off, m_on = statistics.median(off), statistics.median(on)
    return {"step_s_without": m_off, "step_s_with": m_on, "step_ratio": m_on / m_off,
            "first_step_after_apply_s": statistics.median(first_on)}


def builtin_style(path, arch, targets, weight: float) -> dict:
    """The built-in's method on the same job: read the file, CPU backup of each weight, delta as its own
    tensor (up @ down * scale * multiplier), then weight.copy_(weight + delta)."""
    backups = {}
    lora = None

    def first():
        nonlocal lora
        lora = files.read(path, arch)
        with torch.no_grad():
            for name, m in lora.modules.items():
                p = targets[name].param
                backups[name] = p.to("cpu", copy=True)
                delta = m.delta(p.shape) * weight
                p.copy_((p.to(delta.dtype) + delta).to(p.dtype))

    def change():
        with torch.no_grad():
            for name, m in lora.modules.items():
                p = targets[name].param
                p.copy_(backups[name])
                delta = m.delta(p.shape) * (weight / 2)
                p.copy_((p.to(delta.dtype) + delta).to(p.dtype))

    def restore():
        with torch.no_grad():
            for name in lora.modules:
                targets[name].param.copy_(backups[name])

    out = {"first_apply_s": timed(first), "weight_change_s": timed(change), "restore_s": timed(restore)}
    out["extra_bytes"] = sum(b.numel() * b.element_size() for b in backups.values())
    return out


def copy_floor(targets, names) -> float:
    """One read and one write of every touched weight."""
    params = [targets[n].param for n in names]
    spare = [torch.empty_like(p) for p in params]

    def run():
        for s, p in zip(spare, params):
            s.copy_(p)
    run()
    return timed(run)


def warm_memory(nbytes: int) -> None:
    """Touch and free `nbytes` of memory first. On the VMs this was measured on, the first touch of memory the
    guest never used costs ~1.5 s/GB (the host backs it lazily), later touches ~0.2 s/GB; without this, that
    one-time cost falls on whichever method runs first. A webui that has been running has paid it already."""
    buf = torch.ones(nbytes // 4)
    del buf
    gc.collect()


def compare_networks(names: list, model, host) -> dict:
    """Apply, weight change and restore in merge mode for one file of each type (rank 4, every Linear and Conv
    layer; IA3 and the first GLoRA layout on the Linear ones; full also on conv_in / conv_out / the time
    embedding, biases included; norm on every norm layer), against a plain LoCon of the same layers measured in
    the same run."""
    from random_networks import make_random_dora, make_random_network

    targets = host.applied_targets()
    folder = tempfile.mkdtemp(prefix="lora_ext_bench_types_")
    results = {}
    for name in ["lora"] + [n for n in names if n != "lora"]:
        linear_only = name in ("ia3", "glora_v1")
        modules = make_random_dora(model) if name == "dora" else make_random_network(model, name, conv=not linear_only)
        path = os.path.join(folder, f"{name}.safetensors")
        files.write_kohya(path, files.kohya_tensors(modules, torch.float16), {"ss_output_name": name})
        snapshot = {n: targets[n].param.clone() for n in list(modules)[:5]}
        engine = Engine()
        r = {"modules": len(modules), "file_bytes": os.path.getsize(path),
             "first_apply_s": timed(lambda: engine.apply(host, [Request(path, 1.0, 1.0)])),
             "weight_change_s": timed(lambda: engine.apply(host, [Request(path, 0.5, 0.5)])),
             "restore_s": timed(lambda: engine.restore(host))}
        r["bit_exact_after_restore"] = all(torch.equal(targets[n].param, v) for n, v in snapshot.items())
        results[name] = r
    base = results["lora"]
    return {"model": "SD1.5-shaped, random weights, fp32", "threads": torch.get_num_threads(), "results": results,
            "ratios_against_locon_in_this_run": {
                n: {k: r[k] / base[k] for k in ("first_apply_s", "weight_change_s", "restore_s")}
                for n, r in results.items()}}


def step_medians(model, size: int, rounds: int, engine, host, setups: dict) -> dict:
    """Median UNet step time of each setup {label: (requests, mode)}, the setups taking turns each round."""
    unet = model.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, size // 8, size // 8, generator=g)
    ctx = torch.randn(1, 77, 768, generator=g)
    t = torch.tensor([500])
    times = {label: [] for label in setups}
    with torch.no_grad():
        for _ in range(rounds):
            for label, (requests, mode) in setups.items():
                engine.apply(host, requests, mode=mode)
                unet(x, t, context=ctx)         # the first step after a switch pays for the memory touched
                times[label] += [timed(lambda: unet(x, t, context=ctx)) for _ in range(2)]
    engine.restore(host)
    return {label: statistics.median(v) for label, v in times.items()}


def panel_features(model, host, path: str, size: int, rounds: int) -> dict:
    """Block weights (first apply and a change of vector, merge mode), a masked slot and two masked slots
    (per-step cost in bypass, whatever the mode, against the same slots unmasked in bypass and against no
    LoRA), and a step range's boundary (merge: one re-merge; bypass: a list swap), each against the plain
    slot's figure measured in the same run."""
    from lora_ext import blocks
    from lora_ext.panel import masks

    engine = Engine()
    engine.apply(host, [Request(path)])         # the file read once (cached): the timings below are the engine's
    engine.restore(host)
    vector = lambda *v: tuple(blocks.parse(",".join(map(str, v)), "sd1").items())  # noqa: E731
    half, quarter = vector(1, *[0.5] * 16), vector(1, *[0.25] * 16)
    r = {"plain_first_apply_s": timed(lambda: engine.apply(host, [Request(path)])),
         "plain_weight_change_s": timed(lambda: engine.apply(host, [Request(path, 0.5, 0.5)]))}
    engine.restore(host)
    r["blocks_first_apply_s"] = timed(lambda: engine.apply(host, [Request(path, blocks=half)]))
    r["blocks_change_s"] = timed(lambda: engine.apply(host, [Request(path, blocks=quarter)]))
    engine.restore(host)
    left = torch.zeros(size, size)
    left[:, : size // 2] = 1
    a, b = masks.Mask(left), masks.Mask(1 - left)
    r["step_s"] = step_medians(model, size, rounds, engine, host, {
        "no_lora": ([], "merge"), "merged": ([Request(path)], "merge"), "bypass": ([Request(path)], "bypass"),
        "masked": ([Request(path, mask=a)], "merge"),
        "two_masked": ([Request(path, 0.5, 0.5, mask=a), Request(path, 0.7, 0.7, mask=b)], "merge"),
        "two_bypass": ([Request(path, 0.5, 0.5), Request(path, 0.7, 0.7)], "bypass")})
    late = [Request(path, start=0.5)]
    for mode in ("merge", "bypass"):
        engine.apply(host, late, mode, at=0.0)
        r[f"{mode}_boundary_s"] = timed(lambda: engine.apply(host, late, mode, at=0.5))
        engine.restore(host)
    s = r["step_s"]
    r["ratios"] = {
        "blocks_first_apply_over_plain": r["blocks_first_apply_s"] / r["plain_first_apply_s"],
        "blocks_change_over_plain_change": r["blocks_change_s"] / r["plain_weight_change_s"],
        "masked_step_over_bypass_step": s["masked"] / s["bypass"],
        "masked_step_over_no_lora_step": s["masked"] / s["no_lora"],
        "two_masked_step_over_two_bypass_step": s["two_masked"] / s["two_bypass"],
        "bypass_step_over_merged_step": s["bypass"] / s["merged"],
        "merge_boundary_over_plain_change": r["merge_boundary_s"] / r["plain_weight_change_s"],
        "bypass_boundary_over_plain_change": r["bypass_boundary_s"] / r["plain_weight_change_s"],
    }
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--size", type=int, default=256, help="image size for the UNet step timing (latent = size/8)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of (2 steps without, 2 with) per mode")
    ap.add_argument("--network", help="compare apply costs of these types against LoCon instead: "
                                      "comma-separated, of loha,lokr,ia3,oft,boft,glora,glora_v1,full,norm,dora")
    ap.add_argument("--panel", action="store_true", help="block weights, masks and step ranges instead")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.network:
        model = tiny.build("sd1-full")
        model.requires_grad_(False)
        names = [n.strip() for n in args.network.split(",") if n.strip()]
        print(json.dumps(compare_networks(names, model, WebuiHost(model)), indent=2,
                         default=lambda v: round(v, 4) if isinstance(v, float) else str(v)))
        return

    t0 = time.perf_counter()
    model = tiny.build("sd1-full")
    model.requires_grad_(False)
    build_s = time.perf_counter() - t0
    host = WebuiHost(model)
    targets = host.lora_targets()
    folder = tempfile.mkdtemp(prefix="lora_ext_bench_")
    path = os.path.join(folder, f"rank{args.rank}.safetensors")
    modules = make_random_lora(model, rank=args.rank, alpha=args.rank / 2, conv_rank=None)
    files.write_kohya(path, files.kohya_tensors(modules, torch.float16), {"ss_network_dim": args.rank})
    del modules
    lora = files.read(path, host.arch)
    touched = sum(targets[n].param.numel() for n in lora.modules)
    warm_memory(touched * 4 * 2)
    snapshot = {n: targets[n].param.clone() for n in list(lora.modules)[:5]}
    result = {"model": "SD1.5-shaped, random weights, fp32", "rank": args.rank, "modules": len(lora.modules),
              "touched_weights": touched, "file_bytes": os.path.getsize(path), "threads": torch.get_num_threads(),
              "build_s": round(build_s, 1)}

    if args.panel:
        result["panel"] = panel_features(model, host, path, args.size, args.rounds)
        print(json.dumps(result, indent=2, default=lambda v: round(v, 4) if isinstance(v, float) else str(v)))
        return
    for mode in ("merge", "bypass"):
        engine = Engine()
        gc.collect()
        rss0 = rss_bytes()
        r = {"first_apply_s": timed(lambda: engine.apply(host, [Request(path, 1.0, 1.0)], mode=mode))}
        gc.collect()
        r["extra_rss_bytes"] = rss_bytes() - rss0
        state = engine._states[model]
        r["extra_held_bytes"] = (sum(m.original.numel() * m.original.element_size() for m in state.merged.values())
                                 + sum(n for _, _, n in engine.cache._items.values()))
        r["weight_change_s"] = timed(lambda: engine.apply(host, [Request(path, 0.5, 0.5)], mode=mode))
        r["reads_from_disk"] = engine.cache.reads
        r["restore_s"] = timed(lambda: engine.restore(host))
        r["bit_exact_after_restore"] = all(torch.equal(targets[n].param, v) for n, v in snapshot.items())
        r.update(unet_step_times(model, args.size, args.rounds, engine, host, [Request(path, 1.0, 1.0)], mode))
        result[mode] = r

    floor = copy_floor(targets, list(lora.modules))
    base = builtin_style(path, host.arch, targets, 1.0)
    result["floor_copy_s"] = floor
    result["builtin_style"] = base
    m = result["merge"]
    result["ratios"] = {
        "merge_step_with_over_without": m["step_ratio"],
        "bypass_step_with_over_without": result["bypass"]["step_ratio"],
        "merge_weight_change_over_floor": m["weight_change_s"] / floor,
        "merge_first_apply_over_builtin_style": m["first_apply_s"] / base["first_apply_s"],
        "merge_weight_change_over_builtin_style": m["weight_change_s"] / base["weight_change_s"],
        "merge_restore_over_builtin_style": m["restore_s"] / base["restore_s"],
        "merge_extra_memory_over_builtin_style": m["extra_held_bytes"] / base["extra_bytes"],
    }
    print(json.dumps(result, indent=2, default=lambda v: round(v, 4) if isinstance(v, float) else str(v)))


if __name__ == "__main__":
    main()
