"""The "Additional Networks" panel of txt2img/img2img."""
from __future__ import annotations

import gradio as gr

TITLE = "Additional Networks"


def build_panel(is_img2img: bool) -> list:
    """Adds the panel to the current gradio context; returns the components whose values reach the script."""
    tab = "img2img" if is_img2img else "txt2img"
    with gr.Accordion(TITLE, open=False, elem_id=f"lora_ext_{tab}_panel"):
        gr.Markdown("Weighted LoRA slots are not available yet in this version.", elem_id=f"lora_ext_{tab}_note")
    return []
