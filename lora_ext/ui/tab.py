"""The "LoRA" tab: one builder used by the webui (scripts/) and the standalone app. What differs between the
two hosts (folders, the model in use, its lock, the checkpoint list, refreshing the host's own lists,
interrogators) comes in a TabContext; the sub-tabs never import the webui."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import gradio as gr

from . import compare_tab, concepts_tab, inspect_tab, merge_tab, train_tab


@dataclass
class TabContext:
    lora_folder_fn: object              # () -> the LoRA folder
    ckpt_folder_fn: object = None       # () -> the checkpoints folder (merge)
    library: object = None              # LoraLibrary
    session: object = None              # TrainingSession
    host_fn: object = None              # () -> the host adapter training runs on
    presets_folder: str = "presets"
    model_label_fn: object = lambda: ""                 # () -> markdown naming the model training will use
    lock: object = contextlib.nullcontext               # () -> context manager: the model is ours inside it
    checkpoints_fn: object = None       # () -> checkpoint names the model can be switched to
    switch_fn: object = None            # (name) -> message, after loading that checkpoint
    on_written: object = lambda kind, path: None        # ('lora' | 'checkpoint', path): refresh host lists
    interrogators: dict = field(default_factory=dict)   # name -> (PIL image) -> caption
    bake_fn: object = None              # ([(lora name, unet ratio, te ratio)]) -> Outcome (in-memory merge)
    progress_js: str | None = None      # JS function giving the Train click a task id for the host's progress bar
    compare_folder_fn: object = None    # () -> where comparison grids go (default: <LoRA folder>/compare)
    release_fn: object = None           # (host) -> None: the panel's LoRAs given back before the tab uses the model
    compare_renderer_fn: object = None  # () -> render(plan, save, weight, prompt): the host's own generation


def _unless_none(value):
    return gr.update() if value is None else value


def build_tab(ctx: TabContext, css: str | None = None) -> gr.Blocks:
    """The tab's Blocks. `css`: for the standalone app (the webui loads the extension's style.css itself)."""
    with gr.Blocks(analytics_enabled=False, css=css) as block:
        with gr.Tabs(elem_id="lora_ext_tabs"):
            if ctx.session is not None:
                with gr.Tab("Train", elem_id="lora_ext_tab_train"):
                    polled, form_fields = train_tab.build(ctx)
                # no progress frame: on a poll every 2 s gradio would keep the outputs framed as "pending"
                block.load(lambda: train_tab.progress(ctx.session), outputs=polled, every=2, show_progress="hidden")
                with gr.Tab("Concepts", elem_id="lora_ext_tab_concepts"):
                    concepts_tab.build(ctx.interrogators, form_fields)
            if ctx.host_fn is not None:
                with gr.Tab("Compare", elem_id="lora_ext_tab_compare"):
                    compare_message, compare_job = compare_tab.build(ctx)
                block.load(lambda: _unless_none(compare_job.poll()), outputs=[compare_message], every=2,
                           show_progress="hidden")
            if ctx.ckpt_folder_fn is not None:
                with gr.Tab("Merge", elem_id="lora_ext_tab_merge"):
                    merge_message, merge_job = merge_tab.build(ctx)
                block.load(lambda: _unless_none(merge_job.poll()), outputs=[merge_message], every=2,
                           show_progress="hidden")
            with gr.Tab("Inspect", elem_id="lora_ext_tab_inspect"):
                inspect_tab.build(ctx.lora_folder_fn)
    return block
