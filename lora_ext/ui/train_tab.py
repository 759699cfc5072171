"""The Train sub-tab: the form (from train_fields), presets, the dataset check, start / cancel / resume, and
live progress (status line, loss plot, sample gallery)."""
from __future__ import annotations

import os
import re
import tempfile
import time

import gradio as gr

from . import gradio_compat
from . import train_fields as tf

_PRESET = re.compile(r"^[\w\- .]{1,64}$")


def form_to_config(values: list):
    """(TrainConfig or None, message)."""
    from ..train.config import GUIDE_DEFAULTS, ConfigError, from_dict
    from ..train.outputs import check_outputs

    try:
        cfg = from_dict({**GUIDE_DEFAULTS, **tf.values_to_options(values)}, "form")
        check_outputs(cfg)
        return cfg, ""
    except (ConfigError, ValueError) as e:
        return None, f"**Check the form:** {e}"


def check_dataset(host_fn, values: list, lock=None, estimate: bool = True):
    """(report dict or None, markdown): the dataset report, errors blocking the start and warnings not, the
    step count and the estimated memory need. `lock` (a context manager) keeps the host's model to us while
    the estimate borrows it (in the webui: its generation lock)."""
    from ..hosts import UnsupportedModel
    from ..train import memory, network_args
    from ..train.dataset import DatasetError
    from ..train.loop import prepare_data, schedule

    cfg, msg = form_to_config(values)
    if cfg is None:
        return None, msg
    try:
        host = host_fn()
        scan, report = prepare_data(host, cfg)
    except DatasetError as e:
        return None, f"**Dataset:** {e}"
    except UnsupportedModel as e:       # a loaded model (or host) lora_ext does not train on
        return None, f"**Cannot train here:** {e}"
    _, _, steps, _ = schedule(scan, cfg)      # as the run counts them (buckets, accumulation)
    lines = [f"**{report['train_images']} images** ({report['reg_images']} regularization), "
             f"{report['samples_per_epoch']} samples per epoch, **{steps} steps** at batch {'/'.join(str(x.batch_size) for x in scan.layouts)}.",
             f"Estimated memory: {memory.summary(host, cfg, lock) if estimate else 'not while a run is going'}.",
             _network_line(network_args.spec(cfg))]
    lines += [f"- {c['concept']}: {c['images']} images, {c['missing_captions']} without caption"
              + (f", {c['share_of_train']:.0%} of each epoch" if c["share_of_train"] is not None else " (regularization)")
              for c in report["concepts"]]
    lines += [f"- skipped {s['file']}: {s['reason']}" for s in report["skipped"]]
    lines += [f"- warning: {w}" for w in report["warnings"]]
    return report, "\n".join(lines)


def start(session, host_fn, lock, task_id, values: list) -> str:
    """Handler of Train: the model is taken from the click on (its memory estimate, then the run), so that a
    second click at the same moment is told, not run beside the first on the same weights."""
    clicked = time.time()
    cfg, msg = form_to_config(values)
    if cfg is None:
        return msg
    if not session.reserve():
        return "A training run is already going (or its memory is being estimated): wait for it, or cancel it."
    started = False
    try:
        report, text = check_dataset(host_fn, values, lock())
        if report is None:
            return text
        started = session.start(cfg, task_id or None, requested_at=clicked, reserved=True)
        return "Training started.\n\n" + text
    finally:
        if not started:
            session.release()


def check(session, host_fn, lock, values: list) -> str:
    """Handler of Check: the report, with the memory estimate unless a run (or an estimate) has the model."""
    held = session.reserve()
    try:
        return check_dataset(host_fn, values, lock(), held)[1]
    finally:
        if held:
            session.release()


def _network_line(spec) -> str:
    conv = f", convolutions at dim {spec.conv_dim} alpha {spec.conv_alpha:g}" if spec.conv_dim else ""
    notes = "".join(f"\n- note: {n}" for n in spec.notes)
    return f"Network: **{spec.title}** ({spec.module}), dim {spec.dim} alpha {spec.alpha:g}{conv}.{notes}"


def preset_path(folder: str, name: str) -> str:
    """Ours (.toml); a kohya_ss GUI configuration (.json) put into the folder is read where no .toml is."""
    if not name or not _PRESET.match(name) or name.startswith("."):
        raise ValueError(f"preset name {name!r}: letters, digits, spaces, '-', '_' and '.' only")
    path = os.path.join(folder, name + ".toml")
    gui = os.path.join(folder, name + ".json")
    return gui if not os.path.exists(path) and os.path.exists(gui) else path


def save_preset(folder: str, name: str, values: list) -> str:
    from ..atomic import atomic_write
    from ..train.config import to_toml

    cfg, msg = form_to_config(values)
    if cfg is None:
        return msg
    try:
        path = preset_path(folder, name)
    except ValueError as e:
        return f"**Preset:** {e}"
    atomic_write(path, to_toml(cfg).encode("utf-8"), overwrite=True)
    return f"Saved preset **{name}** ({path}); `python -m lora_ext train --config {path}` trains the same way."


def load_preset(folder: str, name: str):
    """(form values or None, message)."""
    from ..train.config import ConfigError, from_dict, load_config_dict

    try:
        path = preset_path(folder, name)
        values, notes = load_config_dict(path)
        cfg = from_dict(values, path)
    except (ValueError, ConfigError) as e:
        return None, f"**Preset:** {e}"
    taken = "".join(f"\n- {n}" for n in notes)
    return tf.options_to_values(cfg), f"Loaded preset **{name}**." + (f" From the kohya_ss GUI's file:{taken}" if notes else "")


def delete_preset(folder: str, name: str) -> str:
    try:
        path = preset_path(folder, name)
    except ValueError as e:
        return f"**Preset:** {e}"
    if not os.path.isfile(path):
        return f"**Preset:** there is no preset {name!r}."
    os.remove(path)
    return f"Deleted preset **{name}**."


def list_presets(folder: str) -> list:
    if not os.path.isdir(folder):
        return []
    return sorted({n[:-5] for n in os.listdir(folder) if n.endswith((".toml", ".json"))})


def progress(session):
    """(status markdown, loss plot path or None, sample paths). Polled every 2 s: the plot is drawn again only
    when steps were added since it was last drawn."""
    plot = None
    n = len(session.losses)
    if n >= 2:
        plot = os.path.join(tempfile.gettempdir(), f"lora_ext_loss_{id(session)}.png")
        if session.plotted != n or not os.path.exists(plot):
            from ..train.loss_plot import loss_plot
            loss_plot(session.losses[:n], plot)
            session.plotted = n
    return session.status(), plot, list(session.samples)


def build(ctx) -> tuple:
    """Adds the Train controls to the current gradio context; returns (the progress outputs to poll, the form's
    components by option name)."""
    from ..train.config import GUIDE_DEFAULTS, TrainConfig

    session, host_fn, presets_folder = ctx.session, ctx.host_fn, ctx.presets_folder
    # a run's LoRA goes where both LoRA lists (ours, the built-in's cards) find it, unless told otherwise
    defaults = tf.options_to_values(TrainConfig(**{**GUIDE_DEFAULTS, "output_dir": ctx.lora_folder_fn()}))
    # a function, so each page load reads it; Check dataset and Train read it again (the webui's own
    # checkpoint dropdown may have switched the model since)
    model_label = gr.Markdown(ctx.model_label_fn, elem_id="lora_ext_train_model")
    if ctx.checkpoints_fn is not None:
        with gr.Row():
            ckpt = gr.Dropdown(label="Switch to checkpoint", choices=ctx.checkpoints_fn(), elem_id="lora_ext_train_ckpt")
            ckpt_refresh = gr.Button("Refresh", elem_id="lora_ext_train_ckpt_refresh")
            switch_b = gr.Button("Load checkpoint", elem_id="lora_ext_train_ckpt_load")
        # the webui's own checkpoint dropdown may have switched the model meanwhile: the label is read again
        ckpt_refresh.click(lambda: (gr.update(choices=ctx.checkpoints_fn()), ctx.model_label_fn()),
                           outputs=[ckpt, model_label])
    with gr.Row():
        preset = gr.Dropdown(label="Preset", choices=list_presets(presets_folder), allow_custom_value=True,
                             elem_id="lora_ext_train_preset")
        load_b = gr.Button("Load", elem_id="lora_ext_train_preset_load")
        save_b = gr.Button("Save", elem_id="lora_ext_train_preset_save")
        delete_b = gr.Button("Delete", elem_id="lora_ext_train_preset_delete")
    inputs = _form(defaults)
    with gr.Row():
        check_b = gr.Button("Check dataset", elem_id="lora_ext_train_check")
        start_b = gr.Button("Train", variant="primary", elem_id="lora_ext_train_start")
        cancel_b = gr.Button("Cancel", elem_id="lora_ext_train_cancel")
    message = gr.Markdown(elem_id="lora_ext_train_message")
    gr.HTML("", elem_id="lora_ext_train_progress")      # the host's progress bar goes above this
    task = gr.Textbox(visible=False, elem_id="lora_ext_train_task")
    status = gr.Markdown(elem_id="lora_ext_train_status")
    with gr.Row():
        plot = gr.Image(label="Loss", type="filepath", interactive=False, elem_id="lora_ext_train_loss")
        gallery = gr.Gallery(label="Samples", elem_id="lora_ext_train_samples")

    if ctx.checkpoints_fn is not None:
        switch_b.click(lambda name: (switch_checkpoint(ctx, session, name), ctx.model_label_fn()), inputs=[ckpt],
                       outputs=[message, model_label])
    check_b.click(lambda *v: (check(session, host_fn, ctx.lock, list(v)), ctx.model_label_fn()),
                  inputs=inputs, outputs=[message, model_label])
    start_b.click(lambda t, *v: (start(session, host_fn, ctx.lock, t, list(v)), ctx.model_label_fn()), inputs=[task] + inputs, outputs=[message, model_label],
                  **gradio_compat.js(ctx.progress_js))
    cancel_b.click(lambda: (session.cancel(), "Cancelling at the next step...")[1], outputs=[message])
    _wire_presets(presets_folder, preset, (load_b, save_b, delete_b), inputs, message)
    gr.Button("Refresh progress", elem_id="lora_ext_train_refresh").click(
        lambda: progress(session), outputs=[status, plot, gallery])
    return [status, plot, gallery], {f.name: c for f, c in zip(tf.FIELDS, inputs)}


def _form(defaults: list) -> list:
    """The training form: one accordion per group of fields, each field's component at its default value."""
    inputs = []
    for group in tf.GROUPS:
        with gr.Accordion(group, open=group in ("Model & output", "Dataset"), elem_id=f"lora_ext_train_{_slug(group)}"):
            with gr.Row():
                for field, value in zip(tf.FIELDS, defaults):
                    if field.group == group:
                        inputs.append(_component(field, value))
    return inputs


def _wire_presets(folder: str, preset, buttons: tuple, inputs: list, message) -> None:
    """Load / Save / Delete of the named preset: each says what it did in `message`; Save and Delete refresh
    the dropdown's choices."""
    load_b, save_b, delete_b = buttons
    presets = lambda: gr.update(choices=list_presets(folder))  # noqa: E731
    save_b.click(lambda n, *v: (save_preset(folder, n, list(v)), presets()), inputs=[preset] + inputs,
                 outputs=[message, preset])
    delete_b.click(lambda n: (delete_preset(folder, n), presets()), inputs=[preset], outputs=[message, preset])
    load_b.click(lambda n: _loaded(load_preset(folder, n), len(inputs)), inputs=[preset], outputs=inputs + [message])


def switch_checkpoint(ctx, session, name: str) -> str:
    """Handler: load another checkpoint before training (never during a run)."""
    if not name:
        return "Choose a checkpoint first."
    if not session.reserve():
        return "**Not now:** a training run is using the loaded model; cancel it or wait for it to finish."
    try:
        return ctx.switch_fn(name)
    finally:
        session.release()


def _loaded(result, n):
    values, message = result
    return ([gr.update(value=v) for v in values] if values else [gr.update()] * n) + [message]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _component(field, value):
    eid = f"lora_ext_train_{field.name}"
    kw = dict(label=field.label, info=field.tip, elem_id=eid)
    if field.kind == "bool":
        return gr.Checkbox(value=bool(value), **kw)
    if field.kind == "choice":
        return gr.Dropdown(choices=list(field.choices), value=value, **kw)
    if field.kind in ("int", "number"):
        return gr.Number(value=value, precision=0 if field.kind == "int" else None, **kw)
    if field.kind == "lines":
        return gr.Textbox(value=value, lines=2, **kw)
    return gr.Textbox(value=value, **kw)
