"""The math of each network type as pure functions on tensors: weight deltas (for merging) and forward
deltas (for training and bypass). Shapes follow the files: kohya LoRA `down` [r, in(, kh, kw)] and `up`
[out, r(, 1, 1)]; LyCORIS LoHa/LoKr factors as the webui's built-in reads them.

All deltas are returned unscaled by the user's weight; `scale` is alpha / rank of the file."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def lora_weight_delta(up: torch.Tensor, down: torch.Tensor, scale: float, mid: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """delta W = up @ down * scale, with the shape of the target weight (Linear [out, in] or Conv
    [out, in, kh, kw]: the kxk kernel lives in `down`, `up` is 1x1; or, LoCon with a CP core, in `mid`)."""
    up2 = up.reshape(up.shape[0], -1)
    if mid is not None:
        return cp_weight(mid, up2.T, down.reshape(down.shape[0], -1)) * scale
    if down.ndim == 4:
        # [out, r] x [r, in, kh, kw] -> [out, in, kh, kw]
        return torch.einsum("or,rikl->oikl", up2, down) * scale
    return (up2 @ down) * scale


def lora_forward_delta(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scale: float,
                       conv: dict | None = None) -> torch.Tensor:
    """The LoRA branch of the forward pass, without forming delta W: up(down(x)) * scale.
    `conv` holds stride/padding/dilation of the target Conv2d (None for Linear)."""
    if conv is None:
        return F.linear(F.linear(x, down), up.reshape(up.shape[0], -1)) * scale
    h = F.conv2d(x, down, **conv)
    return F.conv2d(h, up.reshape(up.shape[0], -1, 1, 1)) * scale


def cp_weight(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Rebuild a Tucker/CP-decomposed kernel: core t [r, r, kh, kw], wa [r, out], wb [r, in]."""
    return torch.einsum("ijkl,io,jn->onkl", t, wa, wb)


def _plain(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)


def loha_weight_delta(w1a, w1b, w2a, w2b, scale: float, shape, t1=None, t2=None) -> torch.Tensor:
    """LoHa: (w1a @ w1b) * (w2a @ w2b) (Hadamard product), optionally with CP cores, times scale."""
    m1 = cp_weight(t1, w1a, w1b) if t1 is not None else _plain(w1a, w1b).reshape(shape)
    m2 = cp_weight(t2, w2a, w2b) if t2 is not None else _plain(w2a, w2b).reshape(shape)
    return (m1 * m2).reshape(shape) * scale


def lokr_weight_delta(w1, w2, scale: float, shape) -> torch.Tensor:
    """LoKr: kron(w1, w2) reshaped to the target, times scale. w1/w2 are full factors here (the caller
    rebuilds them from their low-rank or CP parts)."""
    if w2.ndim == 4 and w1.ndim == 2:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()).reshape(shape) * scale


def lokr_factor(full, a, b, t=None) -> torch.Tensor:
    if full is not None:
        return full
    if t is not None:
        return cp_weight(t, a, b)
    return a @ b.reshape(b.shape[0], -1) if b.ndim == 2 else torch.einsum("or,rikl->oikl", a, b)


def dora_norm(weight: torch.Tensor, per_output: bool = False) -> torch.Tensor:
    """The norms DoRA's magnitude replaces: one per input channel (over every other axis; the webui's
    built-in Lora and our files), shaped [1, in, 1..], or with `per_output` one per output channel [out, 1..]
    (LyCORIS's default, wd_on_output)."""
    if per_output:
        return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *[1] * (weight.ndim - 1))
    norm = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1, keepdim=True)
    return norm.reshape(weight.shape[1], *[1] * (weight.ndim - 1)).transpose(0, 1)


def dora_axis(magnitude: torch.Tensor, weight_shape) -> bool | None:
    """Which norms a stored magnitude holds, told by its shape: False = per input channel [1, in, 1..],
    True = per output channel [out, 1..] (the axis LyCORIS calls wd_on_output; ComfyUI tells it the same
    way), None when the shape fits neither."""
    shape, ndim = tuple(magnitude.shape), len(weight_shape)
    if shape == (1, weight_shape[1], *[1] * (ndim - 2)):
        return False
    if shape == (weight_shape[0], *[1] * (ndim - 1)):
        return True
    return None


def dora_delta(delta: torch.Tensor, base: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA (weight-decomposed LoRA) as the webui's built-in Lora applies it: the merged weight W0 + delta is
    rescaled to the stored magnitude `dora_scale` along its norms' axis, and the change is that minus W0.
    `delta` is already scaled by alpha/rank (the built-in scales before it decomposes). The built-in always
    takes per-input-channel norms; a per-output magnitude (LyCORIS's wd_on_output) would only broadcast
    there into a wrong weight, so its axis is read from its shape instead, as ComfyUI does."""
    per_output = dora_axis(magnitude, base.shape)
    if per_output is None:
        from .kinds.base import BadModule
        raise BadModule(f"dora_scale {list(magnitude.shape)} does not fit the layer's {list(base.shape)}")
    merged = base + delta
    return merged * (magnitude.to(merged.dtype) / dora_norm(merged, per_output)) - base


def factorize(dim: int, factor: int = -1) -> tuple[int, int]:
    """LoKr's split of one dimension into (m, n), m * n = dim, m <= n: `factor` itself when it divides dim,
    else the divisor nearest the square root that is no larger than `factor` (any, for -1)."""
    if factor > 0 and dim % factor == 0:
        return tuple(sorted((factor, dim // factor)))
    limit = dim if factor <= 0 else factor
    m = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0 and d <= limit)
    return m, dim // m
