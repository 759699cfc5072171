"""The Inspect sub-tab: what a LoRA file holds: architecture, network, hashes, rank/alpha per block, the
training settings from its ss_* metadata, and its tag frequency (tables sort by a click on a header)."""
from __future__ import annotations

import gradio as gr

from .. import library
from .tables import read_only_table

BLOCK_HEADERS = ["block", "modules", "rank", "alpha"]
SETTING_HEADERS = ["setting", "value"]
TAG_HEADERS = ["tag", "count", "folder"]


def inspect_file(folder: str, name: str):
    """Handler: (summary markdown, block rows, setting rows, tag rows, full report or None). Never raises:
    a bad file is a message."""
    from ..tools.describe import block_rows, describe_lora, setting_rows, tag_rows
    from ..files import LoraFileError, read

    if not name:
        return "Choose a LoRA file.", [], [], [], None
    try:
        path = library.resolve(folder, name)
        lora = read(path)
        report = describe_lora(lora)
    except (LoraFileError, library.UnsafeName, OSError) as e:
        return f"**Cannot read it:** {e}", [], [], [], None
    kinds = ", ".join(f"{k} rank {v['rank']} / alpha {v['alpha']:g}" if v else f"{k} ranks vary"
                      for k, v in report["by_kind"].items())
    summary = (f"**{name}**: {report['arch'].upper()} {report['network']} ({report['format']}, {report['container']}), "
               f"{report['modules']['unet']} UNet and {report['modules']['te']} text-encoder modules; {kinds}.  \nsha256 `{report.get('sha256', '')}` · addnet hash `{report.get('addnet_hash', '')}`")
    summary += "".join(f"  \n**Warning:** {w}." for w in report["warnings"])
    if report["unmatched"] and not report["warnings"]:
        summary += f"  \n{len(report['unmatched'])} keys matched no layer of this architecture."
    return summary, block_rows(lora), setting_rows(lora.metadata), tag_rows(lora.metadata), report


def build(folder_fn) -> None:
    """Adds the Inspect controls to the current gradio context; `folder_fn()` gives the LoRA folder."""
    with gr.Row():
        choice = gr.Dropdown(label="LoRA file", choices=library.list_loras(folder_fn()), elem_id="lora_ext_inspect_file")
        refresh = gr.Button("Refresh", elem_id="lora_ext_inspect_refresh")
    message = gr.Markdown(elem_id="lora_ext_inspect_message")
    with gr.Row():
        blocks = read_only_table(BLOCK_HEADERS, ["str", "number", "str", "str"], "Rank and alpha per block",
                                 "lora_ext_inspect_blocks")
        settings = read_only_table(SETTING_HEADERS, ["str", "str"], "Training settings (ss_* metadata)",
                                   "lora_ext_inspect_settings")
    tags = read_only_table(TAG_HEADERS, ["str", "number", "str"], "Tag frequency", "lora_ext_inspect_tags")
    with gr.Accordion("Everything (JSON)", open=False):
        report = gr.JSON(label="Contents", elem_id="lora_ext_inspect_report")
    refresh.click(lambda: gr.update(choices=library.list_loras(folder_fn())), outputs=[choice])
    choice.change(lambda n: inspect_file(folder_fn(), n), inputs=[choice],
                  outputs=[message, blocks, settings, tags, report])
