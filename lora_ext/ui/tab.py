"""The "LoRA" tab: one builder used by the webui (scripts/) and the standalone app."""
from __future__ import annotations

import gradio as gr

from . import inspect_tab


def build_tab(folder_fn) -> gr.Blocks:
    with gr.Blocks(analytics_enabled=False) as block:
        with gr.Tabs(elem_id="lora_ext_tabs"):
            with gr.Tab("Inspect", elem_id="lora_ext_tab_inspect"):
                inspect_tab.build(folder_fn)
    return block
