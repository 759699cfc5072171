"""A VAE of its own for a headless run (kohya's --vae): a .safetensors (or a pickled .ckpt / .pt, read without
running its code) in the original (ldm) layout, with or without a checkpoint's `first_stage_model.` prefix, or
in diffusers' layout (diffusion_pytorch_model.safetensors of a `vae` folder, or such a file renamed), loaded
into the host's VAE whichever of the two layouts that is. The two layouts name the same tensors: a level's
`down.{i}.block.{j}` is `down_blocks.{i}.resnets.{j}`, the decoder's levels are counted from the other end,
and the middle attention's 1x1 convolutions are diffusers' linear layers."""
from __future__ import annotations

import re

PREFIXES = ("first_stage_model.", "vae.")
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


class VaeFileError(ValueError):
    """A VAE file that does not fit the model; the message says what to fix."""


# ldm name -> diffusers name, rule by rule (`levels`: the decoder's number of levels, counted from the other end)
_RULES = (
    (r"(encoder|decoder)\.mid\.block_([12])\.(.*)",
     lambda m, levels: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_shortcut(m[3])}"),
    (r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(.*)",
     lambda m, levels: f"{m[1]}.mid_block.attentions.0.{_ATTENTION[m[2]]}.{m[3]}"),
    (r"encoder\.down\.(\d+)\.block\.(\d+)\.(.*)",
     lambda m, levels: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_shortcut(m[3])}"),
    (r"encoder\.down\.(\d+)\.downsample\.conv\.(.*)",
     lambda m, levels: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"),
    (r"decoder\.up\.(\d+)\.block\.(\d+)\.(.*)",
     lambda m, levels: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}.{_shortcut(m[3])}"),
    (r"decoder\.up\.(\d+)\.upsample\.conv\.(.*)",
     lambda m, levels: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"),
    (r"(encoder|decoder)\.norm_out\.(.*)", lambda m, levels: f"{m[1]}.conv_norm_out.{m[2]}"),
)


def diffusers_key(ldm_key: str, levels: int) -> str:
    """The diffusers name of a VAE tensor named in the ldm layout (`levels`: the decoder's number of levels)."""
    for pattern, name in _RULES:
        m = re.fullmatch(pattern, ldm_key)
        if m:
            return name(m, levels)
    return ldm_key          # conv_in, conv_out, quant_conv, post_quant_conv: the same in both


def _shortcut(rest: str) -> str:
    return rest.replace("nin_shortcut.", "conv_shortcut.")


def file_of(path: str) -> str:
    """The weights file of a VAE given as a file, or as a diffusers folder (or the `vae` folder inside one)."""
    import os

    for folder in (path, os.path.join(path, "vae")):
        for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
    return path


def load_into(vae, path: str) -> int:
    """The file's tensors into `vae` (its own layout, ldm or diffusers); the number of tensors loaded.
    VaeFileError when the file is no VAE of this model's shape."""
    from .checkpoint import CheckpointError, read_state_dict

    try:
        sd = read_state_dict(file_of(path))
    except CheckpointError as e:
        raise VaeFileError(f"vae {e}") from None
    for prefix in PREFIXES:
        if any(k.startswith(prefix + "encoder.") for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    own = vae.state_dict()
    ldm_model = any(k.startswith("encoder.down.") for k in own)
    levels = 1 + max((int(m[1]) for k in (own if ldm_model else sd)
                      for m in [re.match(r"decoder\.up\.(\d+)\.", k)] if m), default=-1)
    # each of the model's tensors -> its name in the file
    if ldm_model and not any(k.startswith("encoder.down.") for k in sd):
        names = {k: diffusers_key(k, levels) for k in own}
    elif not ldm_model and any(k.startswith("encoder.down.") for k in sd):
        names = {diffusers_key(k, levels): k for k in sd if k.startswith(("encoder.", "decoder.", "quant", "post_quant"))}
        names = {k: names.get(k, k) for k in own}
    else:
        names = {k: k for k in own}
    missing = [k for k, name in names.items() if name not in sd]
    if missing:
        raise VaeFileError(f"vae {path}: it lacks {len(missing)} of the VAE's {len(own)} tensors (e.g. {names[missing[0]]}): "
                           "give a VAE file (ldm or diffusers layout) of this model's family")
    loaded = {}
    for k, name in names.items():
        t = sd[name]
        if t.numel() == own[k].numel() and t.shape != own[k].shape:
            t = t.reshape(own[k].shape)         # the middle attention: a 1x1 convolution <-> a linear layer
        if t.shape != own[k].shape:
            raise VaeFileError(f"vae {path}: {name} is {list(t.shape)}, the model's is {list(own[k].shape)}: a VAE "
                               "of another model family")
        loaded[k] = t.to(own[k].dtype)
    vae.load_state_dict(loaded, strict=False)
    return len(loaded)
