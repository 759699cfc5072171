"""The Merge sub-tab: LoRAs into a checkpoint (a new file), with names kept inside their folders."""
from __future__ import annotations

import os

import gradio as gr

from .. import library


def parse_lora_lines(text: str) -> list:
    """'name[:ratio[:te ratio]]' per line -> [(name, unet, te)]."""
    from ..cli import parse_lora_arg

    return [parse_lora_arg(line.strip()) for line in (text or "").splitlines() if line.strip()]


def merge(ckpt_folder: str, lora_library, base: str, lora_lines: str, out_name: str, precision: str,
          overwrite: bool) -> str:
    """Handler: a message (never a traceback)."""
    from ..merge import Item, MergeError, merge_checkpoint

    try:
        base_path = library.resolve(ckpt_folder, base)
        if not out_name.endswith((".safetensors", ".ckpt")):
            out_name += ".safetensors"
        out_path = library.resolve(ckpt_folder, out_name)
        items = [Item(lora_library.path(name), unet, te) for name, unet, te in parse_lora_lines(lora_lines)]
        if not items:
            return "**Add at least one LoRA** (one per line: name:ratio:text-encoder ratio)."
        report = merge_checkpoint(base_path, items, out_path, precision, overwrite)
    except (library.UnsafeName, FileNotFoundError, MergeError, ValueError) as e:
        return f"**Cannot merge:** {e}"
    return (f"Wrote **{os.path.relpath(out_path, ckpt_folder)}** ({report['merged_tensors']} tensors changed, "
            f"{report['seconds']:.1f} s), sha256 {report['sha256'][:10]}.")


def build(ckpt_folder_fn, lora_library) -> None:
    def checkpoints():
        folder = ckpt_folder_fn()
        return sorted(n for n in os.listdir(folder) if n.endswith((".safetensors", ".ckpt"))) if os.path.isdir(folder) else []

    with gr.Row():
        base = gr.Dropdown(label="Base checkpoint", choices=checkpoints(), elem_id="lora_ext_merge_base")
        out = gr.Textbox(label="New checkpoint name", elem_id="lora_ext_merge_out")
    loras = gr.Textbox(label="LoRAs", lines=3, info="One per line: name[:UNet ratio[:text-encoder ratio]]",
                       elem_id="lora_ext_merge_loras")
    with gr.Row():
        precision = gr.Radio(["fp16", "bf16", "fp32"], value="fp16", label="Precision", elem_id="lora_ext_merge_precision")
        overwrite = gr.Checkbox(label="Overwrite an existing file", value=False, elem_id="lora_ext_merge_overwrite")
        go = gr.Button("Merge", variant="primary", elem_id="lora_ext_merge_go")
    message = gr.Markdown(elem_id="lora_ext_merge_message")
    go.click(lambda *a: merge(ckpt_folder_fn(), lora_library, *a), inputs=[base, loras, out, precision, overwrite],
             outputs=[message])
