"""Benchmark in the real Forge (the real-Forge test tier's harness: ../shared/forge or $LORA_EXT_FORGE; its
venv from `bash .ci/setup`). Prints JSON; every ratio is against a baseline measured in the same run.

- startup: Forge's own start-up profile (/internal/profile-startup) with the extension installed; our
  script's load time, and the whole start-up against the same Forge without the extension.
- apply (the tier's SD1.5-shaped model: full text encoder and VAE, reduced UNet; a LoCon of every layer; fp32
  on the CPU): the time a generation takes over a plain one when it first uses the LoRA and when its weight
  changes, for our panel and for Forge's built-in `<lora:>`, in one Forge (2 steps at 64 px), each the
  fastest of 3.

    .venv/bin/python bench/forge.py
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from real_forge import harness  # noqa: E402
from real_webui.harness import Server  # noqa: E402
from webui import free_port, startup  # noqa: E402  (bench/webui.py: the same start-up measure)


def timed(server, prompt, slots=None) -> float:
    t = time.perf_counter()
    server.txt2img(prompt, slots, steps=2)
    return time.perf_counter() - t


def apply(paths, rounds: int = 3) -> dict:
    prompt = "a photo of a cat"
    use = {"panel": lambda w: (prompt, [{"enabled": True, "model": harness.LORA, "weight": w}]),
           "builtin": lambda w: (f"{prompt} <lora:{harness.LORA[:-12]}:{w}>", None)}
    server = Server(paths, free_port(), log_name="bench-apply.log", base_flags=harness.FLAGS).start()
    try:
        timed(server, prompt)
        plain = min(timed(server, prompt) for _ in range(rounds))
        out = {"plain_s": round(plain, 3)}
        for kind, how in use.items():
            first = min((timed(server, prompt), timed(server, *how(0.8)))[1] for _ in range(rounds)) - plain
            change = min((timed(server, *how(0.8)), timed(server, *how(0.5)))[1] for _ in range(rounds)) - plain
            out[kind] = {"first_use_over_plain_s": round(first, 3), "weight_change_over_plain_s": round(change, 3)}
        for key in ("first_use_over_plain_s", "weight_change_over_plain_s"):
            out[f"panel_vs_builtin_{key[:-2]}"] = round(out["panel"][key] / max(out["builtin"][key], 1e-3), 3)
        return out
    finally:
        server.stop()


def main() -> None:
    source = harness.forge_source()
    with tempfile.TemporaryDirectory() as work:
        paths = harness.make_work_copy(work, source, harness.forge_python(source))
        result = {"host": "Forge dfdcbab6 (gradio 4.40), CPU", "startup": startup(paths, flags=harness.FLAGS),
                  "apply": apply(paths)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
