"""The Inspect sub-tab: what a LoRA file holds (architecture, network, rank/alpha, metadata, hashes)."""
from __future__ import annotations

import gradio as gr

from .. import library


def inspect_file(folder: str, name: str):
    """Handler: (report dict or None, message). Never raises: a bad file is a message."""
    from ..describe import describe
    from ..files import LoraFileError

    if not name:
        return None, "Choose a LoRA file."
    try:
        path = library.resolve(folder, name)
        return describe(path), f"**{name}** read."
    except (LoraFileError, library.UnsafeName) as e:
        return None, f"**Cannot read it:** {e}"


def build(folder_fn) -> None:
    """Adds the Inspect controls to the current gradio context; `folder_fn()` gives the LoRA folder."""
    with gr.Row():
        choice = gr.Dropdown(label="LoRA file", choices=library.list_loras(folder_fn()), elem_id="lora_ext_inspect_file")
        refresh = gr.Button("Refresh", elem_id="lora_ext_inspect_refresh")
    message = gr.Markdown(elem_id="lora_ext_inspect_message")
    report = gr.JSON(label="Contents", elem_id="lora_ext_inspect_report")
    refresh.click(lambda: gr.update(choices=library.list_loras(folder_fn())), outputs=[choice])
    choice.change(lambda n: inspect_file(folder_fn(), n), inputs=[choice], outputs=[report, message])
