"""`python -m lora_ext ui`: the same tab as in the webui, served by itself on 127.0.0.1, on a tiny model
(for development, and for the browser test). Its folders live under one work folder."""
from __future__ import annotations

import os


def make_app(folder: str, arch: str = "sd1"):
    """(gradio Blocks, TabContext) for a standalone tab over a tiny model, with its folders under `folder`."""
    from ..hosts.webui import WebuiHost
    from ..library import LoraLibrary
    from ..testing import tiny
    from ..train.loop import train
    from .tab import TabContext, build_tab
    from .training_session import TrainingSession

    loras, ckpts, presets = (os.path.join(folder, d) for d in ("Lora", "Stable-diffusion", "presets"))
    for d in (loras, ckpts, presets):
        os.makedirs(d, exist_ok=True)
    host = WebuiHost(tiny.build(arch))
    base = os.path.join(ckpts, f"tiny-{arch}.safetensors")
    if not os.path.exists(base):
        tiny.save_checkpoint(host.model, base)
    ctx = TabContext(lambda: loras, lambda: ckpts, LoraLibrary(lambda: [loras]),
                     TrainingSession(lambda cfg, ev, stop: train(host, cfg, ev, stop)), lambda: host, presets,
                     f"Standalone: training uses a tiny random **{arch.upper()}** model.")
    return build_tab(ctx), ctx


def serve(folder: str, port: int, arch: str = "sd1") -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    block, _ = make_app(folder, arch)
    block.queue().launch(server_name="127.0.0.1", server_port=port, share=False)
