"""Benchmark in the real webui 1.10.1 (the test tier's harness: ../shared/a1111 or $LORA_EXT_WEBUI; its venv
from `bash .ci/setup`). Prints JSON; every ratio is against a baseline measured in the same run.

- startup: the webui's own start-up profile with the extension installed; our script's load time, and the
  whole start-up against the same webui without the extension.
- apply (full-size SD1.5 shapes, random weights, fp32 on the CPU; a rank-16 LoRA of every attention and
  text-encoder layer): the time a generation takes over a plain one when it first uses the LoRA, when its
  weight changes, when it is turned off, and the webui process's RSS kept after the first use, for our panel
  and for the built-in `<lora:>`, each in a fresh webui (1 step at 64 px: what is timed is the LoRA work).
- `--train` (alone): on the same full-size model, seconds from pressing Train in the LoRA tab to its status
  showing the first step (headless Chromium; the model already loaded, no second copy), against the
  headless `python -m lora_ext train` of the checkpoint with the same data and options, launch to first step.

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


def startup(paths, rounds: int = 2, flags=harness.FLAGS) -> dict:
    """Start-up with and without the extension, alternated, each the fastest of `rounds` (file caches warm
    after the first start). `flags`: the host's start-up flags (Forge's differ)."""
    def profile(log_name):
        server = harness.Server(paths, free_port(), log_name=log_name, base_flags=flags).start()
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
    from random_networks import make_random_lora
    from lora_ext import tiny

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


TRAIN_STEPS = 3
# the tab's own values (config.GUIDE_DEFAULTS) where the form below leaves them, as the command line's
# options; mixed precision "no": on the CPU the tab's fp16 trains in fp32 on the webui's fp32 model, where a
# headless fp16 run would store the frozen weights in fp16
TRAIN_FLAGS = ["--resolution", "256", "--network_dim", "16", "--network_alpha", "8", "--train_batch_size", "1",
               "--max_train_steps", str(TRAIN_STEPS), "--learning_rate", "1e-4", "--lr_scheduler", "cosine_with_restarts",
               "--caption_extension", ".txt", "--mixed_precision", "no", "--save_precision", "fp16", "--seed", "42"]


def _train_in_tab(server, data: str) -> float:
    """Seconds from pressing Train in the LoRA tab to its status showing the first step (the status is polled
    every 2 s: up to that much late), on the model the webui has loaded; then waits for the run's end."""
    import re

    from playwright.sync_api import expect

    from real_webui.test_webui_browser import _subtab, browser_page
    from test_browser import _fill, _md, _tab

    with browser_page(server) as page:
        _tab(page, "LoRA")
        _subtab(page, "Train")
        for group in ("network", "optimizer_schedule", "samples_saving"):
            page.locator(f"#lora_ext_train_{group} .label-wrap").first.click()
        for field, value in (("train_data_dir", data), ("output_name", "bench_tab"), ("resolution", 256),
                             ("max_train_epochs", 0), ("max_train_steps", TRAIN_STEPS), ("network_dim", 16),
                             ("network_alpha", 8), ("train_batch_size", 1)):
            _fill(page, field, value)
        status = _md(page, "lora_ext_train_status")
        start = time.perf_counter()
        page.locator("#lora_ext_train_start").click()
        expect(status).to_contain_text(re.compile(rf"Step \d+/{TRAIN_STEPS}"), timeout=600_000)
        first = time.perf_counter() - start
        expect(status).to_contain_text(f"after {TRAIN_STEPS} steps", timeout=600_000)
    return first


def train_start(paths, work) -> dict:
    """The LoRA tab's run on the webui's loaded full-size model against the headless run of the same
    checkpoint, data and options (bench/train.py's reading of its bar): seconds to the first step."""
    import importlib.util

    from lora_ext import sample_data

    spec = importlib.util.spec_from_file_location("bench_train", os.path.join(ROOT, "bench", "train.py"))
    bench_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_train)
    data = sample_data.make_sample_dataset(os.path.join(work, "data"), size=256, per_concept=4)["train"]
    server = harness.Server(paths, free_port(), log_name="bench-train.log").start(timeout_s=900)
    try:
        tab = _train_in_tab(server, data)
        log = server.log()
    finally:
        server.stop()
    if "Traceback" in log:
        raise SystemExit("the webui's log has a traceback:\n" + log[-3000:])
    cmd = [sys.executable, "-m", "lora_ext", "train", "--pretrained_model_name_or_path",
           os.path.join(paths["checkpoints"], FULL), "--train_data_dir", data, "--output_dir",
           os.path.join(work, "headless"), "--output_name", "bench_cli"] + TRAIN_FLAGS
    headless = bench_train.timed_run(cmd, ROOT, {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}, "ours")
    return {"tab_press_to_first_step_s": round(tab, 2), "headless_launch_to_first_step_s": round(headless["first_step_s"], 2),
            "headless_peak_rss_gb": round(headless["peak_rss_gb"], 2),
            "tab_over_headless": round(tab / headless["first_step_s"], 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-apply", action="store_true", help="only the start-up figures")
    ap.add_argument("--train", action="store_true", help="only the LoRA tab's time to its first training step, "
                                                          "against the headless run's")
    args = ap.parse_args()
    source = harness.webui_source()
    work = tempfile.mkdtemp(prefix="lora_ext_bench_webui_")
    try:
        paths = harness.make_work_copy(work, source, harness.repositories(source), harness.webui_python(source))
        if args.train:
            full_size(paths, work)
            print(json.dumps({"train_full_sd15_256px": train_start(paths, work)}, indent=2))
            return 0
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
