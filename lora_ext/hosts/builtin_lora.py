"""Living beside the webui's built-in Lora extension, which patches the same layers.

The built-in keeps, on each layer it touched, a CPU copy of the weight from before its own networks
(`network_weights_backup`; a (in_proj, out_proj) pair on a MultiheadAttention) and the names it applied
(`network_current_names`). Whenever the names it wants differ from those, it copies its backup back and adds
its networks. So:
- the weight before *any* network is its backup when it has one, else the live weight;
- when we change a weight, its backup must become our new weight and its names be cleared, so that on the
  next forward it re-adds its networks on top of ours instead of restoring a stale copy over them.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .base import Bound


def _slot(bound: Bound):
    """(layer that holds the backup, index into its backup pair or None)."""
    if bound.owner is not None:
        return bound.owner, 1
    if isinstance(bound.module, nn.MultiheadAttention):
        return bound.module, 0
    return bound.module, None


def backup_of(bound: Bound):
    layer, index = _slot(bound)
    if bound.part == "bias":
        # one bias backup per layer (an out_proj's in its MultiheadAttention's); an in_proj_bias has none
        return None if index == 0 else getattr(layer, "network_bias_backup", None)
    backup = getattr(layer, "network_weights_backup", None)
    if backup is None:
        return None
    return backup[index] if index is not None else backup


def hand_over(bound: Bound, weight) -> None:
    """Tell the built-in that `weight` is now the layer's weight before its networks."""
    layer, _ = _slot(bound)
    backup = backup_of(bound)
    if backup is not None:
        backup.copy_(weight)
    if getattr(layer, "network_current_names", ()) != ():
        layer.network_current_names = ()


def _backed_up(layer):
    """[(live parameter, the built-in's copy of it from before its networks)] of one layer."""
    weights = getattr(layer, "network_weights_backup", None)
    bias = getattr(layer, "network_bias_backup", None)
    pairs = []
    if isinstance(layer, nn.MultiheadAttention):
        if weights is not None:
            pairs += [(layer.in_proj_weight, weights[0]), (layer.out_proj.weight, weights[1])]
        if bias is not None and layer.out_proj.bias is not None:
            pairs.append((layer.out_proj.bias, bias))
    else:
        if weights is not None:
            pairs.append((layer.weight, weights))
        if bias is not None and getattr(layer, "bias", None) is not None:
            pairs.append((layer.bias, bias))
    return pairs


@contextlib.contextmanager
def checkpoint_weights(model: nn.Module):
    """The checkpoint's own weights for the length of the block (training): the built-in leaves its
    networks' deltas in the weights after a generation until its next use, so a run started after a
    `<lora:x>` prompt would train against model + x. Its backups are copied in for the block and the
    weights as they were (with its deltas) are put back after, so the built-in finds what it left.
    Yields how many layers held its deltas."""
    saved = []
    with torch.no_grad():
        for layer in model.modules():
            if not getattr(layer, "network_current_names", ()):
                continue
            for live, backup in _backed_up(layer):
                saved.append((live, live.detach().to("cpu", copy=True)))
                live.copy_(backup)
    try:
        yield len(saved)
    finally:
        with torch.no_grad():
            for live, value in saved:
                live.copy_(value)
