"""The Merge sub-tab: LoRAs into a checkpoint (a new file) or into the loaded model (in memory), and the LoRA
tools: several LoRAs into one, resize, extract from two checkpoints. Names typed or picked here are
resolved inside their folders (checkpoints, LoRAs) and never escape them; outputs never overwrite unless
asked. Each handler returns a message, never a traceback."""
from __future__ import annotations

import math
import os

import gradio as gr

from .. import library
from .jobs import Job
from .tables import read_only_table

ENERGY_HEADERS = ["module", "kept energy"]


def parse_lora_lines(text: str) -> list:
    """'name[:ratio[:te ratio]]' per line -> [(name, unet, te)]."""
    from ..tools.lora_tools import parse_lora_arg

    return [parse_lora_arg(line.strip()) for line in (text or "").splitlines() if line.strip()]


def add_lora_line(text: str, name: str, unet: float, te: float) -> str:
    if not name:
        return text
    line = f"{name}:{unet:g}:{te:g}"
    return f"{text.rstrip()}\n{line}" if (text or "").strip() else line


def _out_name(name: str, default_ext: str = ".safetensors") -> str:
    name = (name or "").strip()
    if not name:
        raise ValueError("give the new file a name")
    return name if name.endswith((".safetensors", ".ckpt")) else name + default_ext


def _whole(value, what: str, zero_ok: bool = False) -> int:
    """A number field's value as a whole number (gr.Number gives floats, or None when emptied)."""
    if value is None or not math.isfinite(value) or (not zero_ok and value == 0) or value < 0 or value != int(value):
        raise ValueError(f"the {what} must be a whole number{'' if zero_ok else ' of 1 or more'}, not {value}")
    return int(value)


# OSError: a read-only folder, a full disk (the temp file is gone, nothing under the final name)
_EXPECTED = (library.UnsafeName, OSError, ValueError)


def merge(ckpt_folder: str, lora_library, base: str, lora_lines: str, out_name: str, precision: str,
          overwrite: bool, on_written=None, fmt: str = "safetensors", job=None) -> str:
    """LoRAs into a new checkpoint file (`fmt` 'safetensors', or 'ckpt' on request, when the name has none).
    `job` (a jobs.Job running this) is told how far the writing is."""
    from ..merge import Item, MergeError, merge_checkpoint

    try:
        base_path = library.resolve(ckpt_folder, base)
        out_path = library.resolve(ckpt_folder, _out_name(out_name, ".ckpt" if fmt == "ckpt" else ".safetensors"))
        items = [Item(lora_library.path(name), unet, te) for name, unet, te in parse_lora_lines(lora_lines)]
        if not items:
            return "**Add at least one LoRA** (one per line: name:ratio:text-encoder ratio)."
        tell = None if job is None else (lambda i, n: setattr(job, "progress", f"tensor {i} of {n}"))
        report = merge_checkpoint(base_path, items, out_path, precision, overwrite, on_progress=tell)
    except (MergeError, *_EXPECTED) as e:
        return f"**Cannot merge:** {e}"
    if on_written is not None:
        on_written("checkpoint", out_path)
    config = f" and its config **{os.path.basename(report['yaml'])}**" if report["yaml"] else ""
    return (f"Wrote **{os.path.relpath(out_path, ckpt_folder)}**{config} ({report['merged_tensors']} tensors "
            f"changed, {report['seconds']:.1f} s), sha256 `{report['sha256'][:10]}`. A checkpoint list's refresh "
            "button shows it.")


def bake(bake_fn, lora_lines: str) -> str:
    """LoRAs into the loaded model, in memory; `bake_fn(items)` gives a panel.runtime Outcome."""
    try:
        items = parse_lora_lines(lora_lines)
    except ValueError as e:
        return f"**Cannot bake:** {e}"
    if not items:
        return "**Add at least one LoRA** (one per line: name:ratio:text-encoder ratio)."
    outcome = bake_fn(items)
    if outcome.report is None:
        return "**Cannot bake:** " + "; ".join(outcome.messages)
    done = ", ".join(f"{a['name']} ({a['modules']} modules)" for a in outcome.report.applied)
    notes = "".join(f"\n- {m}" for m in outcome.messages)
    return (f"Baked into the loaded model: {done or 'nothing applied'} ({outcome.report.written} weights written). "
            f"Load the checkpoint again to undo.{notes}")


def _energy_rows(per_module: dict) -> list:
    return [[name, round(v, 4)] for name, v in sorted(per_module.items(), key=lambda kv: kv[1])]


def _summary(report: dict) -> str:
    e = report["kept_energy"]
    if not e.get("modules"):
        return ""
    return f" Kept energy over {e['modules']} modules: min {e['min']:.3f}, median {e['median']:.3f}, mean {e['mean']:.3f}."


def _lora_tool(lora_folder: str, out_name: str, on_written, failure: str, work, what):
    """Runs `work(out path) -> report` for a tool writing a LoRA into the LoRA folder: (message, energy rows).
    `what(report)` says what was written; expected errors become "**failure:** why"."""
    try:
        out = library.resolve(lora_folder, _out_name(out_name))
        report = work(out)
    except _EXPECTED as e:
        return f"**{failure}:** {e}", []
    if on_written is not None:
        on_written("lora", out)
    return (f"Wrote **{os.path.relpath(out, lora_folder)}** {what(report)}.{_summary(report)}",
            _energy_rows(report["per_module"]))


def merge_loras(lora_folder: str, lora_library, lora_lines: str, rank: float, out_name: str, precision: str,
                overwrite: bool, on_written=None):
    """(message, energy rows): several LoRAs into one; rank 0 keeps every rank (concatenated)."""
    from ..tools.lora_tools import merge_lora_files

    def work(out):
        items = [(lora_library.path(name), unet) for name, unet, _ in parse_lora_lines(lora_lines)]
        return merge_lora_files(items, out, _whole(rank, "rank", zero_ok=True) or None, precision, overwrite)
    return _lora_tool(lora_folder, out_name, on_written, "Cannot merge the LoRAs", work,
                      lambda r: f"at rank {r['rank']}")


def resize(lora_folder: str, lora_library, name: str, how: str, amount: float, out_name: str, precision: str,
           overwrite: bool, on_written=None):
    """(message, energy rows): a LoRA at a fixed rank, or at the fewest ranks keeping `amount` of the energy."""
    from ..tools.lora_tools import resize_file

    def work(out):
        if not name:
            raise ValueError("choose a LoRA to resize")
        if amount is None:
            raise ValueError("give the rank, or the share of energy to keep")
        rank, energy = (_whole(amount, "rank"), None) if how == "rank" else (None, float(amount))
        return resize_file(lora_library.path(name), out, rank, energy, precision, overwrite)
    return _lora_tool(lora_folder, out_name, on_written, "Cannot resize", work, lambda r: f"(largest rank {r['rank']})")


def extract(ckpt_folder: str, lora_folder: str, base: str, tuned: str, rank: float, conv_rank: float, out_name: str,
            precision: str, overwrite: bool, on_written=None):
    """(message, energy rows): a LoRA from the difference tuned - base."""
    from ..tools.lora_tools import extract_file

    def work(out):
        base_path, tuned_path = library.resolve(ckpt_folder, base), library.resolve(ckpt_folder, tuned)
        return extract_file(base_path, tuned_path, out, _whole(rank, "rank"),
                            _whole(conv_rank, "conv rank", zero_ok=True) or None, precision, overwrite)
    return _lora_tool(lora_folder, out_name, on_written, "Cannot extract", work, lambda r: f"({r['modules']} modules)")


def _output_row(prefix: str):
    with gr.Row():
        out = gr.Textbox(label="New file name", elem_id=f"{prefix}_out")
        precision = gr.Radio(["fp16", "bf16", "fp32"], value="fp16", label="Precision", elem_id=f"{prefix}_precision")
        overwrite = gr.Checkbox(label="Overwrite an existing file", value=False, elem_id=f"{prefix}_overwrite")
    return [out, precision, overwrite]


def build(ctx):
    """Adds the Merge controls; returns (the merge's message box, its Job) for the tab's poll."""
    ckpts = lambda: library.list_checkpoints(ctx.ckpt_folder_fn())       # noqa: E731
    loras = lambda: ctx.library.names() if ctx.library else []   # noqa: E731
    with gr.Row():
        base = gr.Dropdown(label="Base checkpoint", choices=ckpts(), elem_id="lora_ext_merge_base")
        refresh = gr.Button("Refresh lists", elem_id="lora_ext_merge_refresh")
    with gr.Row():
        pick = gr.Dropdown(label="LoRA", choices=loras(), elem_id="lora_ext_merge_pick")
        unet = gr.Number(label="UNet ratio", value=1.0, elem_id="lora_ext_merge_pick_unet")
        te = gr.Number(label="Text-encoder ratio", value=1.0, elem_id="lora_ext_merge_pick_te")
        add = gr.Button("Add", elem_id="lora_ext_merge_add")
    lines = gr.Textbox(label="LoRAs", lines=3, info="One per line: name[:UNet ratio[:text-encoder ratio]]",
                       elem_id="lora_ext_merge_loras")
    add.click(add_lora_line, inputs=[lines, pick, unet, te], outputs=[lines])
    out, precision, overwrite = _output_row("lora_ext_merge")
    fmt = gr.Radio(["safetensors", "ckpt"], value="safetensors", label="Format",
                   info="safetensors loads fast and runs no code; .ckpt only for tools that need it",
                   elem_id="lora_ext_merge_format")
    with gr.Row():
        go = gr.Button("Merge into a new checkpoint", variant="primary", elem_id="lora_ext_merge_go")
        bake_b = gr.Button("Bake into the loaded model (no file)", visible=ctx.bake_fn is not None,
                           elem_id="lora_ext_merge_bake")
    message = gr.Markdown(elem_id="lora_ext_merge_message")
    job = Job("merge")
    go.click(lambda *a: job.run(lambda j: merge(ctx.ckpt_folder_fn(), ctx.library, *a[:5], on_written=ctx.on_written,
                                                fmt=a[5], job=j)),
             inputs=[base, lines, out, precision, overwrite, fmt], outputs=[message])
    if ctx.bake_fn is not None:
        bake_b.click(lambda text: bake(ctx.bake_fn, text), inputs=[lines], outputs=[message])

    src, x_base, x_tuned = _tools(ctx, lines, ckpts, loras)
    refresh.click(lambda: [gr.update(choices=ckpts())] * 3 + [gr.update(choices=loras())] * 2,
                  outputs=[base, x_base, x_tuned, pick, src])
    return message, job


def _tools(ctx, lines, ckpts, loras) -> tuple:
    """The LoRA tools accordion (merge the listed LoRAs into one, resize, extract), each writing into the LoRA
    folder and showing the kept energy per module; returns its lists that Refresh updates (resize's LoRA,
    extract's two checkpoints)."""
    with gr.Accordion("LoRA tools: merge LoRAs, resize, extract", open=False, elem_id="lora_ext_tools"):
        energy = read_only_table(ENERGY_HEADERS, ["str", "number"], "Kept energy per module (lowest first)",
                                 "lora_ext_tools_energy")
        tool_message = gr.Markdown(elem_id="lora_ext_tools_message")
        with gr.Tab("Merge LoRAs into one", elem_id="lora_ext_tools_merge"):
            rank = gr.Number(label="Rank (0 = keep all: ranks concatenated)", value=0, precision=0,
                             elem_id="lora_ext_tools_merge_rank")
            m_out = _output_row("lora_ext_tools_merge")
            gr.Button("Merge the LoRAs listed above", elem_id="lora_ext_tools_merge_go").click(
                lambda *a: merge_loras(ctx.lora_folder_fn(), ctx.library, *a, on_written=ctx.on_written),
                inputs=[lines, rank] + m_out, outputs=[tool_message, energy])
        with gr.Tab("Resize", elem_id="lora_ext_tools_resize"):
            with gr.Row():
                src = gr.Dropdown(label="LoRA", choices=loras(), elem_id="lora_ext_tools_resize_src")
                how = gr.Radio(["rank", "energy"], value="rank", label="Resize to", elem_id="lora_ext_tools_resize_how")
                amount = gr.Number(label="Rank, or share of energy kept (e.g. 0.95)", value=16,
                                   elem_id="lora_ext_tools_resize_amount")
            r_out = _output_row("lora_ext_tools_resize")
            gr.Button("Resize", elem_id="lora_ext_tools_resize_go").click(
                lambda *a: resize(ctx.lora_folder_fn(), ctx.library, *a, on_written=ctx.on_written),
                inputs=[src, how, amount] + r_out, outputs=[tool_message, energy])
        with gr.Tab("Extract from two checkpoints", elem_id="lora_ext_tools_extract"):
            with gr.Row():
                x_base = gr.Dropdown(label="Base checkpoint", choices=ckpts(), elem_id="lora_ext_tools_extract_base")
                x_tuned = gr.Dropdown(label="Fine-tuned checkpoint", choices=ckpts(), elem_id="lora_ext_tools_extract_tuned")
                x_rank = gr.Number(label="Rank", value=32, precision=0, elem_id="lora_ext_tools_extract_rank")
                x_conv = gr.Number(label="Conv rank (0 = none)", value=0, precision=0, elem_id="lora_ext_tools_extract_conv")
            x_out = _output_row("lora_ext_tools_extract")
            gr.Button("Extract", elem_id="lora_ext_tools_extract_go").click(
                lambda *a: extract(ctx.ckpt_folder_fn(), ctx.lora_folder_fn(), *a, on_written=ctx.on_written),
                inputs=[x_base, x_tuned, x_rank, x_conv] + x_out, outputs=[tool_message, energy])
    return src, x_base, x_tuned
