"""LoRA arithmetic: resize a LoRA's rank, merge several LoRAs into one, extract a LoRA from the difference of
two checkpoints. Each module reports the energy it keeps (sum of kept squared singular values / total).

A LoRA's delta up @ down has rank r at most, so its SVD never needs the full matrix: QR of both factors and an
SVD of the small r x r core give it exactly (a rank-16 SD1.5 LoRA resizes in about a second). Only extraction,
whose delta is a full matrix, needs a truncated SVD, and uses torch's randomized one."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..networks.stored import StoredModule


@dataclass
class Factors:
    up: torch.Tensor            # [out, r]
    down: torch.Tensor          # [r, in * k * k]
    energy: float               # fraction of the delta's squared Frobenius norm kept


def _choose_rank(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    total = float((s ** 2).sum())
    if total == 0:
        return 1
    if energy is not None:
        cumulative = torch.cumsum(s ** 2, 0) / total
        r = int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=cumulative.dtype))) + 1
        return max(1, min(r, rank or r, len(s)))
    return max(1, min(rank, len(s)))


def _split(u, s, vh, r, total_energy) -> Factors:
    root = s[:r].sqrt()
    kept = float((s[:r] ** 2).sum() / total_energy) if total_energy > 0 else 1.0
    return Factors((u[:, :r] * root).contiguous(), (root[:, None] * vh[:r]).contiguous(), kept)


def reduce_factors(up: torch.Tensor, down: torch.Tensor, rank: int | None = None, energy: float | None = None) -> Factors:
    """Best rank-`rank` (or fewest ranks keeping `energy`) factors of up @ down, exactly, via QR."""
    up, down = up.double(), down.double()
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(ru @ rd.T)
    r = _choose_rank(s, rank, energy)
    return _split(qu @ u, s, vh @ qd.T, r, float((s ** 2).sum()))


def truncate(delta: torch.Tensor, rank: int | None = None, energy: float | None = None, oversample: int = 8,
             niter: int = 2) -> Factors:
    """Low-rank factors of a full matrix: randomized SVD (torch.svd_lowrank) when a fixed rank is asked,
    exact SVD when a kept energy is."""
    delta = delta.float()
    total = float(delta.pow(2).sum())
    if energy is not None or rank is None or rank + oversample >= min(delta.shape):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    else:
        u, s, v = torch.svd_lowrank(delta, q=rank + oversample, niter=niter)
        vh = v.T
    r = _choose_rank(s, rank, energy)
    return _split(u, s, vh, r, total)


def _as_stored(f: Factors, like: StoredModule | None, kernel_shape) -> StoredModule:
    """A StoredModule with alpha = rank (scale 1), down reshaped as a conv kernel where the layer has one."""
    up, down = f.up.float(), f.down.float()
    if kernel_shape is not None:
        down = down.reshape(down.shape[0], *kernel_shape)
        up = up[:, :, None, None]
    return StoredModule("lora", {"lora_up.weight": up, "lora_down.weight": down}, float(up.shape[1]))


def _lora_factors(m: StoredModule, weight: float = 1.0):
    """(up [out, r] scaled by weight*scale, down [r, in*k*k], kernel shape or None) of a plain LoRA module."""
    up, down = (t.double() for t in m.low_rank())
    kernel = tuple(down.shape[1:]) if down.ndim == 4 else None
    return up.reshape(up.shape[0], -1) * (weight * m.scale), down.reshape(down.shape[0], -1), kernel


def _refuse_inexpressible(name: str, m, what: str) -> None:
    """A module whose change no LoRA can hold: one that depends on the base model's weights (DoRA, IA3, OFT,
    GLoRA), changes a bias (full/diff with diff_b) or a norm layer."""
    kind = "DoRA module (dora_scale)" if m.is_dora else f"{m.kind.title} module"
    if m.needs_base:
        raise ValueError(f"{name}: a {kind} cannot be {what}: its change depends on the base "
                         "model's weights; merge it into a checkpoint instead")
    if m.network == "norm" or m.changes_bias:
        raise ValueError(f"{name}: a {kind} cannot be {what}: it changes a "
                         f"{'norm layer' if m.network == 'norm' else 'bias'}, which a LoRA cannot hold; merge it "
                         "into a checkpoint instead")


def resize(modules: dict, rank: int | None = None, energy: float | None = None, shapes: dict | None = None) -> tuple:
    """({name: StoredModule}, {name: kept energy}) with each module reduced to `rank` (or to the fewest ranks
    keeping `energy` of it). LoHa/LoKr modules (whose deltas are full) need the layer `shapes`."""
    out, kept = {}, {}
    for name, m in modules.items():
        _refuse_inexpressible(name, m, "resized")
        if m.low_rank() is not None:
            up, down, kernel = _lora_factors(m)
            f = reduce_factors(up, down, rank, energy)
        else:
            if shapes is None or name not in shapes:
                raise ValueError(f"{name}: a {m.network} module needs its layer's shape to be resized")
            delta = m.delta(shapes[name])
            kernel = tuple(delta.shape[1:]) if delta.ndim == 4 else None
            f = truncate(delta.reshape(delta.shape[0], -1), rank, energy)
        out[name], kept[name] = _as_stored(f, m, kernel), f.energy
    return out, kept


def merge_loras(loras: list, rank: int | None = None) -> tuple:
    """One LoRA from several: [({name: StoredModule}, weight)]. Without `rank` the ranks are concatenated (the
    sum of deltas, exactly); with it, each module is reduced to its best rank-`rank` approximation."""
    by_name: dict = {}
    for modules, weight in loras:
        for name, m in modules.items():
            _refuse_inexpressible(name, m, "merged with other LoRAs")
            if m.low_rank() is None:
                raise ValueError(f"{name}: merging {m.network} modules into a LoRA is not supported")
            by_name.setdefault(name, []).append(_lora_factors(m, weight))
    out, kept = {}, {}
    for name, parts in by_name.items():
        kernels = {k for _, _, k in parts}
        if len(kernels) != 1:
            raise ValueError(f"{name}: the LoRAs disagree on this layer's kernel")
        up = torch.cat([p[0] for p in parts], dim=1)
        down = torch.cat([p[1] for p in parts], dim=0)
        if rank is None:
            f = Factors(up, down, 1.0)
        else:
            f = reduce_factors(up, down, rank)
        out[name], kept[name] = _as_stored(f, None, kernels.pop()), f.energy
    return out, kept
