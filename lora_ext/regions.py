"""Masks on layers whose output has no image positions: cross-attention's key and value (they read the prompt),
the time-embedding layers of each res block and the UNet's own time / label embeddings. Their change reaches
every position at once, so it cannot be masked where it is made. It is masked one level up instead, at the
nearest module whose output is over the image (the attention, the res block, the UNet): that module is run
again with those changes left out, and the two outputs are blended by the mask,
    out = plain + sum over masks m * (with_m - plain),
so a position where the mask is 0 gets exactly what it gets without them, and with one white mask the
result is the unmasked one."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# ldm/sgm module paths (Target.webui) of layers whose output is not over image positions
_NOT_SPATIAL = ("attn2.to_k", "attn2.to_v", "emb_layers", "time_embed", "label_emb")
# classes whose output is over image positions and that hold such layers (ldm/sgm and diffusers names)
_ANCHORS = {"CrossAttention", "MemoryEfficientCrossAttention", "Attention", "ResBlock", "ResnetBlock2D"}


def spatial(target) -> bool:
    return target.is_unet and not any(part in target.webui for part in _NOT_SPATIAL)


def anchor_of(layer, unet, parents: dict) -> torch.nn.Module:
    """The nearest module above `layer` (inside `unet`; `parents`: id(child) -> parent) whose output is over
    image positions."""
    module = layer
    while id(module) in parents:
        module = parents[id(module)]
        if type(module).__name__ in _ANCHORS:
            return module
    return unet


@dataclass
class Blend:
    """One anchor's blending hook: the masked changes under it, grouped by mask."""
    handle: object = None
    groups: list = field(default_factory=list)      # [(mask, [contribution, ...])]


def blend_hook(blend: Blend, state):
    """A forward hook (with kwargs) for an anchor. `state.suppressed` is the set of contribution ids the
    layers' own hooks leave out; `state.latent` the latent's (h, w)."""
    def rerun(module, args, kwargs, left_out):
        before = set(state.suppressed)
        state.suppressed |= left_out
        try:
            return module.forward(*args, **kwargs)
        finally:
            state.suppressed = before

    @torch.no_grad()
    def hook(module, args, kwargs, output):
        groups = [(mask, {id(c) for c in cs}) for mask, cs in blend.groups if not {id(c) for c in cs} <= state.suppressed]
        if not groups:
            return output
        every = set().union(*(ids for _, ids in groups))
        plain = rerun(module, args, kwargs, every)
        for mask, ids in groups:
            with_m = output if len(groups) == 1 else rerun(module, args, kwargs, every - ids)
            m = mask.over(plain, state.latent)
            if m is not None:
                plain = plain + m * (with_m - plain)
        return plain
    return hook


def sync(state, unet, masked: list) -> None:
    """Anchors and their hooks for `masked`, the (layer, contribution) pairs of masked changes on layers that
    are not spatial; anchors no longer needed lose their hook."""
    wanted: dict = {}
    parents = {id(child): parent for parent in unet.modules() for child in parent.children()} if masked else {}
    for layer, c in masked:
        anchor = anchor_of(layer, unet, parents)
        groups = wanted.setdefault(id(anchor), (anchor, {}))[1]
        groups.setdefault(id(c.mask), (c.mask, []))[1].append(c)
    for key in [k for k in state.blends if k not in wanted]:
        state.blends.pop(key).handle.remove()
    for key, (anchor, groups) in wanted.items():
        blend = state.blends.get(key)
        if blend is None:
            blend = state.blends[key] = Blend()
            blend.handle = anchor.register_forward_hook(blend_hook(blend, state), with_kwargs=True)
        blend.groups[:] = list(groups.values())
