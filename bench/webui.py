"""Benchmark in the real webui 1.10.1 (the test tier's harness: ../shared/a1111 or $LORA_EXT_WEBUI; its venv
from `bash .ci/setup`). Prints JSON; every ratio is against a baseline measured in the same run.

- startup: the webui's own start-up profile with the extension installed; our script's load time, and the
  whole start-up against the same webui without the extension.
- apply (full-size SD1.5 shapes, random weights, fp32 on the CPU; a rank-16 LoRA of every attention and
  text-encoder layer): the time a generation takes over a plain one when it first uses the LoRA, when its
  weight changes, when it is turned off, and the webui process's RSS kept after the first use, for our panel
  and for the built-in `<lora:>`, each in a fresh webui (1 step at 64 px: what is timed is the LoRA work).

    .venv/bin/python bench/webui.py [--skip-apply]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from real_webui import harness  # noqa: E402

LORA = "bench16.safetensors"
FULL = "sd15_full.safetensors"


def rss(server) -> int:
    with open(f"/proc/{server.proc.pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def startup(paths, rounds: int = 2) -> dict:
    """Start-up with and without the extension, alternated, each the fastest of `rounds` (file caches warm
    after the first start)."""
    def profile(log_name):
        server = harness.Server(paths, free_port(), log_name=log_name).start()
        try:
            return server.get("/internal/profile-startup")
        finally:
            server.stop()

    extension = os.path.join(paths["webui"], "extensions", "lora_ext")
    runs = {"with": [], "without": []}
    for _ in range(rounds):
        runs["with"].append(profile("bench-startup.log"))
        os.rename(extension, extension + ".off")
        try:
            runs["without"].append(profile("bench-startup-without.log"))
        finally:
            os.rename(extension + ".off", extension)
    ours, without = (min(runs[k], key=lambda r: r["total"]) for k in ("with", "without"))
    # the profile's records are flat: "load scripts/<script>.py", "app_started_callback/<script>.py", ...
    mine = {k: round(v, 3) for k, v in ours["records"].items() if k.endswith("/lora_ext_webui.py")}
    slower = {k: round(v - without["records"].get(k, 0.0), 2) for k, v in ours["records"].items()
              if "/" not in k and v - without["records"].get(k, 0.0) > 0.05}
    return {"our_script": mine, "startup_s": round(ours["total"], 2),
            "startup_without_extension_s": round(without["total"], 2),
            "startup_ratio": round(ours["total"] / without["total"], 3), "phases_slower_with_it_s": slower}


def full_size(paths, work) -> None:
    from lora_ext import files
    from lora_ext.demo import make_random_lora
    from lora_ext.testing import tiny

    model = tiny.build("sd1-full")
    tiny.save_checkpoint(model, os.path.join(paths["checkpoints"], FULL), os.path.join(work, "clip-full"))
    modules = make_random_lora(model, rank=16, alpha=16.0, conv_rank=None, seed=1)
    files.write_kohya(os.path.join(paths["loras"], LORA), files.kohya_tensors(modules), {})
    del model, modules
    with open(os.path.join(paths["webui"], "config.json"), encoding="utf-8") as f:
        settings = json.load(f)
    settings["sd_model_checkpoint"] = FULL
    with open(os.path.join(paths["webui"], "config.json"), "w", encoding="utf-8") as f:
        json.dump(settings, f)


def timed_gen(server, prompt, slots=None) -> float:
    t = time.perf_counter()
    server.txt2img(prompt, slots, steps=1)
    return time.perf_counter() - t


def apply_run(paths, kind: str) -> dict:
    """One fresh webui: plain, first use at 0.8, change to 0.5, off; times over plain, RSS kept."""
    prompt = "a photo of a cat"
    use = {"panel": lambda w: (prompt, [{"enabled": True, "model": LORA, "weight": w}]),
           "builtin": lambda w: (f"{prompt} <lora:{LORA[:-12]}:{w}>", None)}[kind]
    server = harness.Server(paths, free_port(), log_name=f"bench-{kind}.log").start(timeout_s=900)
    try:
        timed_gen(server, prompt)
        plain = min(timed_gen(server, prompt) for _ in range(2))
        before = rss(server)
        first = timed_gen(server, *use(0.8)) - plain
        kept = rss(server) - before
        change = timed_gen(server, *use(0.5)) - plain
        off = timed_gen(server, prompt) - plain
        return {"plain_s": round(plain, 2), "first_use_s": round(first, 2), "weight_change_s": round(change, 2),
                "off_s": round(off, 2), "rss_kept_gb": round(kept / 2 ** 30, 2)}
    finally:
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-apply", action="store_true", help="only the start-up figures")
    args = ap.parse_args()
    source = harness.webui_source()
    work = tempfile.mkdtemp(prefix="lora_ext_bench_webui_")
    try:
        paths = harness.make_work_copy(work, source, harness.repositories(source), harness.webui_python(source))
        out = {"startup": startup(paths)}
        if not args.skip_apply:
            full_size(paths, work)
            ours, builtin = apply_run(paths, "panel"), apply_run(paths, "builtin")
            out["apply_full_sd15_rank16"] = {
                "panel": ours, "builtin": builtin,
                "ratios_panel_over_builtin": {k: round(ours[k] / builtin[k], 3) if builtin[k] else None
                                              for k in ("first_use_s", "weight_change_s", "rss_kept_gb")}}
        print(json.dumps(out, indent=2))
    except harness.Unavailable as e:
        print(json.dumps({"error": str(e)}))
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
