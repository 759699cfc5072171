"""One slot of the Additional Networks panel: the single source of truth for the UI, the API's named
arguments, the X/Y/Z axes and the infotext.

Infotext uses the additional-networks extension's field names, so images made with it paste into ours:
`AddNet Enabled`, `AddNet Module N` (LoRA), `AddNet Model N` (`name(hash)`), `AddNet Weight A N` (UNet),
`AddNet Weight B N` (text encoder); its older single `AddNet Weight N` is read too. Ours adds
`AddNet Block Weights N` (a preset name or the per-block factors), `AddNet Start N` / `AddNet Stop N` (the
UNet part's share of the sampling steps) and `AddNet Mask N` (the mask's size and a digest of its pixels: a
record, the image itself does not fit in the infotext and is not pasted back) where a slot has them.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

from ..library import display_name
from ..weights import flag_value, weight_value

NONE = "None"
_NAME_HASH = re.compile(r"^(?P<name>.*?)\s*\((?P<hash>[0-9a-fA-F]{6,64})\)$")


@dataclass
class Slot:
    enabled: bool = False
    model: str = NONE           # a name from the models list ('sub/name.safetensors'), or 'None'
    weight: float = 1.0         # the linked weight, used for both parts unless `separate`
    separate: bool = False
    unet: float = 1.0
    te: float = 1.0
    block_weights: str = ""     # a preset name or a comma list of per-block factors (blocks.parse); '' = none
    mask: str = ""              # a mask image as base64 / a data URL (masks.decode); '' = the whole image
    start: float = 0.0          # the UNet part acts from this fraction of the sampling steps ...
    stop: float = 1.0           # ... up to this one

    @property
    def weights(self) -> tuple[float, float]:
        """(UNet weight, text-encoder weight) in effect."""
        return (self.unet, self.te) if self.separate else (self.weight, self.weight)

    @property
    def active(self) -> bool:
        return self.enabled and bool(self.model) and self.model != NONE

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_any(cls, value) -> "Slot":
        """A slot from what arrives as a script argument: a Slot, a dict of named fields (API callers; the
        aliases unet_weight/te_weight/text_encoder_weight are accepted), or None for an unused slot."""
        if isinstance(value, Slot):
            return value
        if value is None:
            return cls()
        if not isinstance(value, dict):
            raise ValueError(f"a slot is given as a dict of {', '.join(f.name for f in fields(cls))}, not {value!r}")
        aliases = {"unet_weight": "unet", "te_weight": "te", "text_encoder_weight": "te", "name": "model",
                   "blocks": "block_weights", "lbw": "block_weights"}
        data = {aliases.get(k, k): v for k, v in value.items()}
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown slot fields: {', '.join(sorted(unknown))}")
        slot = cls(**data)
        if ("unet" in data or "te" in data) and "separate" not in data and "weight" not in data:
            slot.separate = True        # named part weights mean the parts were meant
        slot.enabled, slot.separate = flag_value(slot.enabled, "slot enabled"), flag_value(slot.separate, "slot separate")
        slot.weight, slot.unet, slot.te = (weight_value(getattr(slot, f), f"slot {f}") for f in ("weight", "unet", "te"))
        slot.model = str(slot.model or NONE)
        if isinstance(slot.block_weights, (list, tuple)):       # an API caller's JSON list of factors
            slot.block_weights = ",".join(_fmt(weight_value(v, "block weight")) for v in slot.block_weights)
        slot.block_weights = str(slot.block_weights or "").strip()
        slot.mask = str(slot.mask or "").strip()
        slot.start, slot.stop = _steps(slot.start, slot.stop)
        return slot


def _steps(start, stop) -> tuple[float, float]:
    """(start, stop) as fractions of the sampling steps; ValueError says what to write."""
    values = []
    for what, value in (("start", start), ("stop", stop)):
        x = weight_value(value, f"slot {what}")
        if not 0 <= x <= 1:
            raise ValueError(f"slot {what} {value!r} is a fraction of the sampling steps: from 0 to 1")
        values.append(x)
    if values[0] >= values[1]:
        raise ValueError(f"slot start {values[0]:g} must be below its stop {values[1]:g} (0.4 and 1 = the last 60 % of the steps)")
    return values[0], values[1]


def with_overrides(slots: list, overrides: dict) -> list:
    """Slots with per-slot field overrides applied (X/Y/Z axes: {slot index: {field: value}})."""
    out = []
    for i, slot in enumerate(slots):
        change = overrides.get(i)
        if change:
            slot = Slot.from_any({**slot.to_dict(), **change})
            if "weight" in change and not slot.separate:
                slot.unet = slot.te = slot.weight
        out.append(slot)
    return out


def from_args(args, overrides: dict) -> tuple[list, list]:
    """(slots, problems) from a script's arguments with the X/Y/Z overrides on them: a slot whose arguments
    are wrong stays empty and is said ('slot 2: ...'), the others still act."""
    slots, problems = [], []
    for i, value in enumerate(args):
        try:
            slots += with_overrides([Slot.from_any(value)], {0: overrides[i]} if i in overrides else {})
        except ValueError as e:
            slots.append(Slot())
            problems.append(f"slot {i + 1}: {e}")
    return slots, problems


def to_infotext(slots: list, short_hash, mask_label=lambda slot: "") -> dict:
    """AddNet fields for the active slots, numbered by slot. `short_hash(model)` gives 12 hex or None,
    `mask_label(slot)` what to write of a slot's mask."""
    params = {}
    for i, slot in enumerate(slots, 1):
        if not slot.active:
            continue
        h = short_hash(slot.model)
        unet, te = slot.weights
        params[f"AddNet Module {i}"] = "LoRA"
        params[f"AddNet Model {i}"] = f"{display_name(slot.model)}({h})" if h else display_name(slot.model)
        params[f"AddNet Weight A {i}"] = _fmt(unet)
        params[f"AddNet Weight B {i}"] = _fmt(te)
        if slot.block_weights:
            params[f"AddNet Block Weights {i}"] = slot.block_weights
        if slot.start > 0 or slot.stop < 1:
            params[f"AddNet Start {i}"], params[f"AddNet Stop {i}"] = _fmt(slot.start), _fmt(slot.stop)
        if slot.mask:
            params[f"AddNet Mask {i}"] = mask_label(slot) or "yes"
    if params:
        params = {"AddNet Enabled": "True", **params}
    return params


def _fmt(x: float) -> str:
    return f"{x:g}"


def from_infotext(params: dict, count: int, find) -> list:
    """Slots from pasted infotext parameters. `find(name, hash)` returns a models-list name or None."""
    slots = []
    for i in range(1, count + 1):
        label = params.get(f"AddNet Model {i}")
        if label is None or params.get(f"AddNet Module {i}", "LoRA") != "LoRA" or str(label) == NONE:
            slots.append(Slot())
            continue
        m = _NAME_HASH.match(str(label))
        name, h = (m["name"], m["hash"]) if m else (str(label), None)
        model = find(name, h) or NONE
        legacy = params.get(f"AddNet Weight {i}", "1")
        try:
            unet = weight_value(params.get(f"AddNet Weight A {i}", legacy), "weight")
            te = weight_value(params.get(f"AddNet Weight B {i}", legacy), "weight")
            start, stop = _steps(params.get(f"AddNet Start {i}", 0), params.get(f"AddNet Stop {i}", 1))
        except ValueError:          # pasted text someone edited: the slot stays empty rather than guess
            slots.append(Slot())
            continue
        blocks = str(params.get(f"AddNet Block Weights {i}", "")).strip().strip('"')
        slots.append(Slot(enabled=model != NONE, model=model, weight=unet, separate=unet != te, unet=unet, te=te,
                          block_weights=blocks, start=start, stop=stop))
    return slots
