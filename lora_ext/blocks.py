"""Per-block LoRA weights in the conventions users share for hako-mikan's lora-block-weight (LBW): a vector of
factors, one per block, BASE (the text encoders) first, then the UNet's input blocks (IN00 ...), its middle
block (M00) and its output blocks (OUT00 ...), numbered as the original (ldm/sgm) UNet numbers them.

Vector lengths tell which blocks are meant: SD1/SD2 17 (the blocks a LoRA without conv layers touches) or 26
(every block: LoCon), SDXL 12 or 20. As lora-block-weight expands every vector to all blocks (its `to26`), a
block the vector does not name is at 0: a 17-value vector turns a LoCon's conv-only blocks off. The layers in
no block (the time and label embeddings, the UNet's out layers, a text encoder's embeddings and final norm)
keep the slot's own weight (factor 1). A factor multiplies the slot's UNet weight (BASE: its text-encoder
weight) in every module of that block, so merge and bypass modes cost nothing more per step than without
block weights."""
from __future__ import annotations

import re

SD_BLOCKS = ("BASE",) + tuple(f"IN{i:02d}" for i in range(12)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(12))
XL_BLOCKS = ("BASE",) + tuple(f"IN{i:02d}" for i in range(9)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(9))
_SD_ATTENTION = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00") + tuple(f"OUT{i:02d}" for i in range(3, 12))
_XL_ATTENTION = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00") + tuple(f"OUT{i:02d}" for i in range(6))
LAYOUTS = {"sd": {17: _SD_ATTENTION, 26: SD_BLOCKS}, "sdxl": {12: _XL_ATTENTION, 20: XL_BLOCKS}}

# the common named presets, as sets of the 17 blocks at factor 1 (the others 0), BASE always in
_IN, _OUT = _SD_ATTENTION[1:7], _SD_ATTENTION[8:]
_PRESET_BLOCKS = {
    "NONE": (), "ALL": _SD_ATTENTION,
    "INS": ("BASE",) + _IN[:3], "IND": ("BASE",) + _IN[3:], "INALL": ("BASE",) + _IN,
    "MIDD": ("BASE",) + _IN[3:] + ("M00",) + _OUT[:4], "OUTD": ("BASE",) + _OUT[:4],
    "OUTS": ("BASE",) + _OUT[4:], "OUTALL": ("BASE",) + _OUT,
}
PRESETS = {name: tuple(1.0 if b in on else 0.0 for b in _SD_ATTENTION) for name, on in _PRESET_BLOCKS.items()}
PRESETS["ALL0.5"] = (0.5,) * len(_SD_ATTENTION)
# SDXL's, in the 12-value layout, under the names users share them by (ComfyUI Inspire pack's lbw presets)
XL_PRESETS = {"SDXL-NONE": (0.0,) * 12, "SDXL-ALL": (1.0,) * 12,
              "SDXL-INALL": (1.0,) * 5 + (0.0,) * 7, "SDXL-MIDALL": (1.0,) + (0.0,) * 4 + (1.0,) + (0.0,) * 6,
              "SDXL-OUTALL": (1.0,) + (0.0,) * 5 + (1.0,) * 6}

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def family(arch_name: str) -> str:
    return "sdxl" if arch_name == "sdxl" else "sd"


def block_of(target) -> str | None:
    """The block id of a naming.Target: BASE for the text encoders' transformer layers, INnn / M00 / OUTnn
    for the UNet's blocks, None for layers in no block (as lora-block-weight tells them: a text-encoder
    layer is BASE when its path runs through the encoder's layers)."""
    if not target.is_unet:
        path = target.webui
        return "BASE" if ".encoder." in path or ".resblocks." in path else None
    path = target.webui.removeprefix("model.diffusion_model.")
    head, _, rest = path.partition(".")
    if head == "middle_block":
        return "M00"
    number = rest.partition(".")[0]
    if head in ("input_blocks", "output_blocks") and number.isdigit():
        return f"{'IN' if head == 'input_blocks' else 'OUT'}{int(number):02d}"
    return None


def parse_presets(text: str) -> dict:
    """User presets, one `NAME:v1,v2,...` a line ('#' starts a comment); {NAME: text of the values}. A bad
    line raises ValueError naming its number."""
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, values = line.partition(":")
        if not sep or not _NAME.match(name.strip()) or not values.strip():
            raise ValueError(f"block weight presets, line {n}: write NAME:v1,v2,... (got {line[:40]!r})")
        out[name.strip().upper()] = values.strip()
    return out


def parse(text: str, arch_name: str, user_presets: dict | None = None) -> dict | None:
    """{block id: factor} for every block of the architecture's family, from a preset name or a comma list of
    numbers (the blocks it does not name at 0); None for an empty text (no block weights). Raises ValueError
    with a message that says what to write."""
    text = (text or "").strip()
    if not text:
        return None
    fam = family(arch_name)
    # the common presets are 17-value (SD1/SD2) vectors; an SDXL slot takes SDXL's, the user's and vectors
    named = {**(PRESETS if fam == "sd" else XL_PRESETS), **(user_presets or {})}
    value = named.get(text.upper(), text)
    if value is text and text.upper() in PRESETS:
        raise ValueError(f"block weights {text!r}: the common presets are for SD1/SD2; on SDXL write 12 or 20 "
                         "factors (BASE, then the UNet's blocks), a preset SDXL-NONE, SDXL-ALL, SDXL-INALL, "
                         "SDXL-MIDALL, SDXL-OUTALL, or one of your own")
    if value is text and text.upper() in XL_PRESETS:
        raise ValueError(f"block weights {text!r} is an SDXL preset; on SD1/SD2 write 17 or 26 factors or a "
                         f"preset: {', '.join(sorted(PRESETS))}")
    if value is text and "," not in text:
        raise ValueError(f"block weights {text[:60]!r}: no preset has that name (presets: "
                         f"{', '.join(sorted(named))}); or write the factors separated by commas")
    if isinstance(value, str):
        value = _numbers(value, text)
    layout = LAYOUTS[fam].get(len(value))
    if layout is None:
        counts = " or ".join(str(c) for c in LAYOUTS[fam])
        known = ", ".join(sorted(named))
        raise ValueError(f"block weights {text[:60]!r}: {'SDXL' if fam == 'sdxl' else 'SD1/SD2'} takes {counts} "
                         f"values (BASE, then the UNet's blocks), got {len(value)}; or a preset name: {known}")
    named_blocks = dict(zip(layout, value))
    return {block: named_blocks.get(block, 0.0) for block in LAYOUTS[fam][max(LAYOUTS[fam])]}


def _numbers(values: str, text: str) -> tuple:
    from .weights import weight_value

    try:
        return tuple(weight_value(item, "a factor") for item in values.replace(" ", "").split(","))
    except ValueError as e:
        raise ValueError(f"block weights {text[:60]!r}: {e} (write factors separated by commas, or a preset "
                         "name)") from None

