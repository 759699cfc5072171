"""The "Additional Networks" panel of txt2img/img2img.

Each slot's visible controls feed one gr.State holding that slot's dict (slots.Slot), and those states are the
script's arguments: the webui hands them to process() as they are, and API callers pass the same dicts by
field name. The visible controls are what infotext pastes into."""
from __future__ import annotations

import types
from dataclasses import dataclass, field

import gradio as gr

from . import slots as slotlib
from ..ui import gradio_compat

TITLE = "Additional Networks"


@dataclass
class PanelUI:
    states: list = field(default_factory=list)            # script arguments, one per slot
    infotext_fields: list = field(default_factory=list)   # (component, infotext key or callable)
    paste_field_names: list = field(default_factory=list)
    dropdowns: list = field(default_factory=list)


def _slots_reader(count: int, find):
    """slot i of pasted parameters; the slots are worked out once per paste, not once per field."""
    last = {}

    def slot_of(params: dict, index: int) -> slotlib.Slot:
        key = tuple(sorted((k, str(v)) for k, v in params.items() if k.startswith("AddNet")))
        if last.get("key") != key:
            last["key"], last["slots"] = key, slotlib.from_infotext(params, count, find)
        return last["slots"][index]
    return slot_of


def _slot_dict(*values) -> dict:
    """The slot's state from its controls (in Slot's field order); the mask upload is handed on as a PNG data
    URL, the form API callers send it in."""
    from . import masks

    slot = slotlib.Slot(*values)
    slot.mask = masks.encode(slot.mask) if slot.mask is not None and not isinstance(slot.mask, str) else (slot.mask or "")
    return slot.to_dict()


def _parts_shown(separate: bool, weight: float, unet: float, te: float):
    """Separate ticked or unticked: show the part sliders or the linked one. Ticked by hand (both parts still
    alike), the parts start at the linked weight; ticked by a paste (parts that differ), they keep theirs."""
    start = separate and unet == te
    return (gr.update(visible=not separate), gr.update(visible=separate, value=weight if start else unet),
            gr.update(visible=separate, value=weight if start else te))


def build_panel(is_img2img: bool, count: int, names_fn, info_fn, find) -> PanelUI:
    """Adds the panel to the current gradio context. `names_fn()` lists the LoRA names, `info_fn(name)` gives
    a line about one, `find(name, hash)` resolves a pasted infotext label."""
    tab = "img2img" if is_img2img else "txt2img"
    ui = PanelUI()
    slot_of = _slots_reader(count, find)
    choices = lambda: [slotlib.NONE] + names_fn()  # noqa: E731
    with gr.Accordion(TITLE, open=False, elem_id=f"lora_ext_{tab}_panel"):
        refresh = gr.Button("Refresh models", size="sm", elem_id=f"lora_ext_{tab}_refresh")
        for i in range(count):
            c = _slot_components(f"lora_ext_{tab}_slot{i + 1}", i, choices)
            controls = [c.enabled, c.model, c.weight, c.separate, c.unet, c.te, c.block_weights, c.mask, c.start,
                        c.stop]  # Slot's fields
            for control in controls:
                control.change(_slot_dict, inputs=controls, outputs=[c.state], show_progress=False)
            c.separate.change(_parts_shown, inputs=[c.separate, c.weight, c.unet, c.te],
                              outputs=[c.weight, c.unet, c.te], show_progress=False)
            c.model.change(info_fn, inputs=[c.model], outputs=[c.info], show_progress=False)
            n = i + 1
            ui.states.append(c.state)
            ui.dropdowns.append(c.model)
            ui.infotext_fields += [
                (c.module, f"AddNet Module {n}"),
                (c.enabled, lambda d, i=i: slot_of(d, i).enabled),
                (c.model, lambda d, i=i: slot_of(d, i).model),
                (c.weight, lambda d, i=i: slot_of(d, i).weight),
                (c.separate, lambda d, i=i: slot_of(d, i).separate),
                (c.unet, f"AddNet Weight A {n}"),
                (c.te, f"AddNet Weight B {n}"),
                (c.block_weights, lambda d, i=i: slot_of(d, i).block_weights),
                (c.start, lambda d, i=i: slot_of(d, i).start),
                (c.stop, lambda d, i=i: slot_of(d, i).stop),
            ]
            ui.paste_field_names += [f"AddNet Module {n}", f"AddNet Model {n}", f"AddNet Weight A {n}",
                                     f"AddNet Weight B {n}", f"AddNet Block Weights {n}", f"AddNet Start {n}",
                                     f"AddNet Stop {n}"]
        refresh.click(lambda: [gr.update(choices=choices())] * count, outputs=ui.dropdowns, show_progress=False)
    return ui


def _slot_components(eid: str, i: int, choices) -> types.SimpleNamespace:
    """One slot's components, as attributes: enable + model, the weights (one linked, or UNet and text
    encoder), block weights, mask and step range, the info line, and the hidden module label and Slot state."""
    with gr.Group(elem_id=eid):
        with gr.Row():
            enabled = gr.Checkbox(label=f"Enable {i + 1}", value=False, elem_id=f"{eid}_enabled")
            model = gr.Dropdown(label=f"Model {i + 1}", choices=choices(), value=slotlib.NONE,
                                elem_id=f"{eid}_model")
        with gr.Row():
            weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight", elem_id=f"{eid}_weight")
            separate = gr.Checkbox(label="Separate UNet / text encoder", value=False, elem_id=f"{eid}_separate")
            unet = gr.Slider(-2, 2, value=1.0, step=0.05, label="UNet weight", visible=False, elem_id=f"{eid}_unet")
            te = gr.Slider(-2, 2, value=1.0, step=0.05, label="Text encoder weight", visible=False, elem_id=f"{eid}_te")
        block_weights = gr.Textbox(label="Block weights", value="", lines=1, elem_id=f"{eid}_blocks",
                                   placeholder="a preset (ALL, INS, MIDD, OUTALL ...) or factors per "
                                               "block: 17 / 26 values (SDXL 12 / 20)")
        with gr.Accordion("Mask and steps", open=False, elem_id=f"{eid}_region"):
            mask = gr.Image(label="Mask: the UNet part paints where it is white (empty = everywhere)",
                            type="pil", image_mode="RGBA", **gradio_compat.upload_only(), elem_id=f"{eid}_mask")
            with gr.Row():
                start = gr.Slider(0, 1, value=0.0, step=0.05, label="Start (share of the steps)",
                                  elem_id=f"{eid}_start")
                stop = gr.Slider(0, 1, value=1.0, step=0.05, label="Stop (share of the steps)",
                                 elem_id=f"{eid}_stop")
        info = gr.Markdown(elem_id=f"{eid}_info")
        module = gr.Textbox(value="LoRA", visible=False, elem_id=f"{eid}_module")
        state = gr.State(slotlib.Slot().to_dict())
    return types.SimpleNamespace(enabled=enabled, model=model, weight=weight, separate=separate, unet=unet, te=te,
                                 block_weights=block_weights, mask=mask, start=start, stop=stop, info=info,
                                 module=module, state=state)
