"""`python -m lora_ext ui`: the same tab as in the webui, served by itself on 127.0.0.1, on a tiny model
(for development, and for the browser test). Its folders live under one work folder; its "checkpoint list"
is the checkpoint files there, and switching loads one into the tiny model (same architecture only)."""
from __future__ import annotations

import os
import threading

from . import gradio_compat


class StandaloneModel:
    """The one model of the standalone app: which checkpoint it holds, and loading another into it."""

    def __init__(self, host, ckpt_folder: str, current: str):
        self.host, self.folder, self.current = host, ckpt_folder, current
        self.lock = threading.Lock()

    def label(self) -> str:
        return (f"Standalone: training uses a tiny random **{self.host.arch.name.upper()}** model, loaded from "
                f"`{self.current}`.")

    def switch(self, name: str) -> str:
        from .. import library
        from ..hosts.checkpoint import CheckpointError, checkpoint_keys, read_state_dict

        try:
            state = read_state_dict(library.resolve(self.folder, name))
        except (library.UnsafeName, CheckpointError, OSError) as e:
            return f"**Cannot load it:** {e}"
        # checked before anything is copied, so a file that does not fit leaves the model as it was
        own = self.host.model.state_dict()
        keys = checkpoint_keys(self.host.model)
        params = {n for n, _ in self.host.model.named_parameters()}
        misfits = sorted({keys[k] for k in keys if keys[k] in params and k not in state}
                         | {k for k in state if k not in keys or state[k].shape != own[keys[k]].shape})
        if misfits:
            return (f"**Cannot load it:** {name} does not fit this {self.host.arch.name.upper()} model "
                    f"({len(misfits)} tensors missing or of another shape, e.g. {misfits[0]})")
        with self.lock:
            self.host.model.load_state_dict({keys[k]: v for k, v in state.items()}, strict=False)
        self.current = name
        return f"Loaded **{name}**."


def make_app(folder: str, arch: str = "sd1"):
    """(gradio Blocks, TabContext) for a standalone tab over a tiny model, with its folders under `folder`."""
    from ..hosts import for_model
    from ..library import LoraLibrary, list_checkpoints
    from ..panel.runtime import PanelRuntime
    from .. import tiny
    from ..train.loop import train
    from .tab import TabContext, build_tab
    from .training_session import TrainingSession

    loras, ckpts, presets = (os.path.join(folder, d) for d in ("Lora", "Stable-diffusion", "presets"))
    for d in (loras, ckpts, presets):
        os.makedirs(d, exist_ok=True)
    host = for_model(tiny.build(arch))
    name = f"tiny-{arch}.safetensors"
    if not os.path.exists(os.path.join(ckpts, name)):
        tiny.save_checkpoint(host.model, os.path.join(ckpts, name))
    model = StandaloneModel(host, ckpts, name)
    lib = LoraLibrary(lambda: [loras])
    runtime = PanelRuntime(lib)

    def bake(items):
        with model.lock:
            return runtime.bake(host, items)

    ctx = TabContext(lambda: loras, lambda: ckpts, lib, TrainingSession(lambda cfg, ev, stop: train(host, cfg, ev, stop)),
                     lambda: host, presets, model_label_fn=model.label, lock=lambda: model.lock,
                     checkpoints_fn=lambda: list_checkpoints(ckpts), switch_fn=model.switch, bake_fn=bake,
                     release_fn=runtime.restore)
    css_path = os.path.join(os.path.dirname(__file__), "..", "..", "style.css")
    css = open(css_path, encoding="utf-8").read() if os.path.isfile(css_path) else None
    return build_tab(ctx, css), ctx


# as the webui's queue (webui.py: queue(64)): a merge or an inspect running never holds up the progress
# poll or a Cancel behind it, which gradio's default of one worker would
QUEUE_WORKERS = 64


def serve(folder: str, port: int, arch: str = "sd1") -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    block, _ = make_app(folder, arch)
    gradio_compat.queue(block, QUEUE_WORKERS).launch(server_name="127.0.0.1", server_port=port, share=False)
