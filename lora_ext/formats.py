"""Key styles of LoRA files, all brought to one form: {kohya module name: {kohya part: tensor}}.

- kohya / LyCORIS: `lora_unet_..._to_q.lora_down.weight`, `.lora_up.weight`, `.alpha`, `.hada_w1_a`, `.lokr_w1`...
- PEFT (diffusers >= 0.24 saves these too): `unet.down_blocks...to_q.lora_A.weight` / `.lora_B.weight`, with
  or without the `unet.` / `text_encoder.` root, or under `base_model.model.`
- older diffusers: `...attn1.processor.to_q_lora.down.weight`, `...to_q.lora.down.weight`,
  `...to_q.lora_linear_layer.down.weight`
- cloneofsimo .pt: a bare list [up, down, up, down, ...] in the order its injector walked the model.
"""
from __future__ import annotations

import re

from . import naming
from .networks.stored import KNOWN_PARTS

_PEFT = re.compile(r"^(?P<m>.+)\.(?:lora_(?P<ab>[AB])(?:\.default)?|lora(?:_linear_layer)?\.(?P<du>down|up))\.weight$")
_PROCESSOR = re.compile(r"^(?P<m>.+?)\.(?:processor\.)?(?P<leaf>to_q|to_k|to_v|to_out)_lora\.(?P<du>down|up)\.weight$")
_ALPHA = re.compile(r"^(?P<m>.+)\.alpha$")
_TE_LEAF = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.")


# module types lora_ext does not apply: a part that only that type stores -> its name (PEFT's OFT keeps its
# rotation in oft_R; the webui's built-in reads it neither). A file holding one is refused by name, never
# applied as something else.
UNSUPPORTED_PARTS = {"oft_R": "PEFT OFT (oft_R)"}


def unsupported_types(keys) -> dict:
    """{type name: an example key} of the module types we cannot apply among `keys` (and a lone `weight` on a
    kohya module name: IA3 without its on_input flag, which no loader can read)."""
    keys = list(keys)
    found = {}
    with_flag = {k.partition(".")[0] for k in keys if k.endswith(".on_input")}
    for key in keys:
        module, _, part = key.partition(".")
        lone_weight = part == "weight" and module.startswith("lora_") and module not in with_flag
        kind = UNSUPPORTED_PARTS.get(part) or ("IA3 without on_input" if lone_weight else None)
        if kind:
            found.setdefault(kind, key)
    return found


def group_kohya(tensors: dict) -> tuple[dict, list]:
    """{module: {part: tensor}} for kohya-style keys; keys with an unknown part are returned apart."""
    modules, stray = {}, []
    for key, t in tensors.items():
        module, _, part = key.partition(".")
        if part in KNOWN_PARTS:
            modules.setdefault(module, {})[part] = t
        else:
            stray.append(key)
    return modules, stray


def _diffusers_root(path: str) -> str:
    path = path.removeprefix("base_model.model.")
    if path.startswith(("unet.", "text_encoder.", "text_encoder_2.")):
        return path
    if path.startswith(_UNET_ROOTS):
        return "unet." + path
    if path.startswith("text_model."):
        return "text_encoder." + path
    return path


def group_diffusers(tensors: dict) -> tuple[dict, list]:
    """{diffusers module path: {kohya part: tensor}} for PEFT and older diffusers keys."""
    modules, stray = {}, []
    for key, t in tensors.items():
        m = _PROCESSOR.match(key)
        if m:
            path = _diffusers_root(m["m"])
            leaf = m["leaf"]
            if path.startswith("unet."):
                module = f"{path}.{'to_out.0' if leaf == 'to_out' else leaf}"
            else:
                module = f"{path}.{_TE_LEAF[leaf]}"
            modules.setdefault(module, {})[f"lora_{m['du']}.weight"] = t
            continue
        m = _PEFT.match(key)
        if m:
            part = {"A": "down", "B": "up"}.get(m["ab"]) or m["du"]
            modules.setdefault(_diffusers_root(m["m"]), {})[f"lora_{part}.weight"] = t
            continue
        m = _ALPHA.match(key)
        if m:
            modules.setdefault(_diffusers_root(m["m"]), {})["alpha"] = t
            continue
        stray.append(key)
    return modules, stray


def key_style(keys) -> str | None:
    keys = list(keys)
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k or k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        return "peft"
    if any(_PROCESSOR.match(k) or _PEFT.match(k) for k in keys):
        return "diffusers"
    return None


def detect_arch(modules: dict, metadata: dict) -> tuple[str, bool]:
    """(architecture, certain): which model a file was made for, from its metadata, then its names, then its
    shapes. SD1 and SD2 LoRAs share their names; without metadata or a telling shape it guesses SD1."""
    base = metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")
    names = list(modules)
    if "sdxl" in base.lower() or any(n.startswith(("lora_te2_", "text_encoder_2.")) for n in names):
        return "sdxl", True
    if any("transformer_blocks_1_" in n or "transformer_blocks.1." in n for n in names):
        return "sdxl", True     # only SDXL has more than one transformer block per level
    if metadata.get("ss_v2") == "True" or "sd_v2" in base or "stable-diffusion-v2" in base:
        return "sd2", True
    if metadata.get("ss_v2") == "False" or "sd_v1" in base:
        return "sd1", True
    for name, parts in modules.items():
        down = parts.get("lora_down.weight")
        if down is None:
            continue
        if name.endswith(("proj_in", "proj_in.weight")):
            return ("sd2" if down.ndim == 2 else "sd1"), True   # SD2 projects with Linear, SD1 with a 1x1 conv
        if name.endswith(("attn2_to_k", "attn2.to_k")) and int(down.shape[1]) in (768, 1024):
            return ("sd2" if down.shape[1] == 1024 else "sd1"), True
    return "sd1", False


# --- cloneofsimo ------------------------------------------------------------------------------------------

def cloneofsimo_order(arch: naming.Arch, with_geglu: bool) -> list:
    """The UNet targets in the order cloneofsimo's injector met them: diffusers' module order (down blocks,
    up blocks, then the mid block), the Linear children of each Attention (and GEGLU)."""
    leaves = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
              "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0") + (("ff.net.0.proj",) if with_geglu else ())
    unet = [t for t in naming.targets(arch) if t.is_unet and ".transformer_blocks." in t.diffusers
            and t.diffusers.endswith(leaves)]
    rank = {"unet.down_blocks": 0, "unet.up_blocks.": 1, "unet.mid_block": 2}
    return sorted(unet, key=lambda t: next(v for k, v in rank.items() if t.diffusers.startswith(k)))


def cloneofsimo_te_order(arch: naming.Arch, layers: int) -> list:
    """Text encoder targets in CLIPAttention's own order: k, v, q, out."""
    by_name = {t.kohya: t for t in naming.targets(arch) if not t.is_unet and t.component in ("te", "te1")}
    prefix = "lora_te1" if arch.name == "sdxl" else "lora_te"
    return [by_name[f"{prefix}_text_model_encoder_layers_{i}_self_attn_{p}_proj"]
            for i in range(layers) for p in ("k", "v", "q", "out")]


def group_cloneofsimo(items: list, arch: naming.Arch) -> dict:
    """{kohya name: parts} for a cloneofsimo list [up, down, ...]; raises ValueError if the list fits no
    layout of `arch`."""
    if len(items) % 2:
        raise ValueError(f"it holds {len(items)} tensors; a cloneofsimo LoRA holds (up, down) pairs")
    pairs = [(items[i], items[i + 1]) for i in range(0, len(items), 2)]
    square = all(up.shape[0] == down.shape[-1] for up, down in pairs)
    if square and len(pairs) % 4 == 0 and len(pairs) // 4 <= arch.text_encoders[0].layers:
        order = cloneofsimo_te_order(arch, len(pairs) // 4)
    else:
        order = next((o for o in (cloneofsimo_order(arch, True), cloneofsimo_order(arch, False))
                      if len(o) == len(pairs)), None)
        if order is None:
            raise ValueError(f"its {len(pairs)} (up, down) pairs match no {arch.name} UNet or text encoder layout")
    return {t.kohya: {"lora_up.weight": up, "lora_down.weight": down} for t, (up, down) in zip(order, pairs)}
