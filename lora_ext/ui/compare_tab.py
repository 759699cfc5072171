"""The Compare sub-tab: a run's saves x weights x test prompts on the loaded model (compare.py), in a thread of
its own with the tab's 2-second poll showing how far it is; cancellable; the pages shown when done."""
from __future__ import annotations

import os
import threading

import gradio as gr

from .jobs import Job


def _plan(folder: str, run: str, prompts: str, weights: str, seed, steps, size):
    from ..tools import compare

    numbers = compare.parse_weights(weights)
    if not run:
        raise compare.CompareError("choose a run (a LoRA name; its numbered saves are the columns)")
    side = int(size or 0)
    return compare.check(compare.Plan(compare.run_saves(folder, run), numbers, str(prompts or "").splitlines(),
                                      int(seed or 0), int(steps or 0), 7.0, (side, side)))


def make_grid(ctx, job, cancel: threading.Event, run, prompts, weights, seed, steps, size) -> str:
    """The work: checks, takes the model (ctx.lock), renders, gives it back. Returns the message."""
    from ..tools import compare

    try:
        plan = _plan(ctx.lora_folder_fn(), run, prompts, weights, seed, steps, size)
        out = compare.new_folder(compare_folder(ctx), run)
        progress = lambda done, total, text: setattr(job, "progress", f"{done} of {total}: {text}")  # noqa: E731
        with ctx.lock():
            host = ctx.host_fn()
            if ctx.compare_renderer_fn is not None:         # the host's own generation (the webui's txt2img)
                result = compare.compare(plan, out, ctx.compare_renderer_fn(), cancel.is_set, progress)
            else:
                if ctx.release_fn is not None:
                    ctx.release_fn(host)        # the panel's LoRAs out of the weights first
                with host.training_weights():   # and the built-in's <lora:> deltas set aside
                    result = compare.compare(plan, out, compare.preview_renderer(host), cancel.is_set, progress)
    except (compare.CompareError, ValueError, OSError, RuntimeError) as e:
        return f"**Not done:** {e}"
    said = "Cancelled; what was done is" if result.cancelled else f"{result.cells} images"
    return f"{said} in `{result.folder}` ({len(result.pages)} pages, index.html beside them)."


def compare_folder(ctx) -> str:
    fn = getattr(ctx, "compare_folder_fn", None)
    return fn() if fn else os.path.join(ctx.lora_folder_fn(), "compare")


def latest_pages(ctx) -> list:
    """The pages of the newest comparison, for the gallery."""
    root = compare_folder(ctx)
    try:
        runs = sorted((os.path.join(root, d) for d in os.listdir(root)), key=os.path.getmtime)
    except OSError:
        return []
    for folder in reversed(runs):
        pages = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("prompt_") and f.endswith(".png"))
        if pages:
            return pages
    return []


def build(ctx):
    """Adds the Compare controls; returns (its message box, its Job) for the tab's poll."""
    from ..tools import compare

    runs = lambda: compare.runs_in(ctx.lora_folder_fn())        # noqa: E731
    with gr.Row():
        run = gr.Dropdown(label="Run (newest first)", choices=runs(), value=(runs() or [None])[0],
                          elem_id="lora_ext_compare_run")
        refresh = gr.Button("Refresh", elem_id="lora_ext_compare_refresh")
    prompts = gr.Textbox(label="Test prompts (one a line: one page each)", lines=3, elem_id="lora_ext_compare_prompts")
    with gr.Row():
        weights = gr.Textbox(label="Weights (rows)", value="0.4, 0.7, 1.0", elem_id="lora_ext_compare_weights")
        seed = gr.Number(label="Seed (every cell)", value=1, precision=0, elem_id="lora_ext_compare_seed")
        steps = gr.Number(label="Steps", value=20, precision=0, elem_id="lora_ext_compare_steps")
        size = gr.Number(label="Size (px)", value=512, precision=0, elem_id="lora_ext_compare_size")
    with gr.Row():
        go = gr.Button("Make the grid", variant="primary", elem_id="lora_ext_compare_go")
        stop = gr.Button("Cancel", elem_id="lora_ext_compare_cancel")
    message = gr.Markdown(elem_id="lora_ext_compare_message")
    gallery = gr.Gallery(label="Pages", elem_id="lora_ext_compare_pages")
    job, cancel = Job("comparison"), threading.Event()

    def start(*values):
        if not job.running:
            cancel.clear()
        return job.run(lambda j: make_grid(ctx, j, cancel, *values))
    go.click(start, inputs=[run, prompts, weights, seed, steps, size], outputs=[message])
    stop.click(lambda: (cancel.set(), "Cancelling after this image...")[1], outputs=[message])
    refresh.click(lambda: (gr.update(choices=runs()), latest_pages(ctx)), outputs=[run, gallery])
    message.change(lambda: latest_pages(ctx), outputs=[gallery], show_progress=False)
    return message, job
