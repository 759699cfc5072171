"""The "LoRA" tab: one builder used by the webui (scripts/) and the standalone app."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from . import concepts_tab, inspect_tab, merge_tab, train_tab


@dataclass
class TabContext:
    lora_folder_fn: object              # () -> the LoRA folder
    ckpt_folder_fn: object = None       # () -> the checkpoints folder (merge)
    library: object = None              # LoraLibrary
    session: object = None              # TrainingSession
    host_fn: object = None              # () -> the host adapter training runs on
    presets_folder: str = "presets"
    model_label: str = ""


def build_tab(ctx) -> gr.Blocks:
    with gr.Blocks(analytics_enabled=False) as block:
        with gr.Tabs(elem_id="lora_ext_tabs"):
            if ctx.session is not None:
                with gr.Tab("Train", elem_id="lora_ext_tab_train"):
                    polled = train_tab.build(ctx.session, ctx.host_fn, ctx.presets_folder, ctx.model_label)
                block.load(lambda: train_tab.progress(ctx.session), outputs=polled, every=2)
                with gr.Tab("Concepts", elem_id="lora_ext_tab_concepts"):
                    concepts_tab.build()
            if ctx.ckpt_folder_fn is not None:
                with gr.Tab("Merge", elem_id="lora_ext_tab_merge"):
                    merge_tab.build(ctx.ckpt_folder_fn, ctx.library)
            with gr.Tab("Inspect", elem_id="lora_ext_tab_inspect"):
                inspect_tab.build(ctx.lora_folder_fn)
    return block
