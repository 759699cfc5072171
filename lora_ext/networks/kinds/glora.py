"""GLoRA (LyCORIS): the layer's own weight passes through a low-rank map, plus a low-rank change of its own:
delta W = W0 @ A + B. Files come in two layouts, told apart by their shapes:
- LyCORIS 2.x and later: `a1` [in, r] and `a2` [r, in] (A = a1 @ a2, applied to W0's input axis),
  `b1` [out, r] (up) and `b2` [r, in, kh, kw] (down; with a Tucker core `bm` [r, r, kh, kw] it is 1x1), scaled
  by alpha / r, as LyCORIS trains it. The webui's built-in cannot apply this layout (its products do not
  fit); LyCORIS and ComfyUI do, and we follow them.
- the first GLoRA files: `a1` [r, in], `a2` [in, r], `b1` [r, in], `b2` [out, r], delta W = b2 @ b1 +
  W0 @ a2 @ a1. The built-in applies this layout, alpha unapplied (its GLoRA has no rank, so its scale is 1);
  we compute what it computes (what users see in the webui; ComfyUI would scale it by alpha / r). On a
  Linear or 1x1 layer only: W0 @ a2 cannot take a kxk kernel.
On a square layer both layouts fit the shapes; the rank tells them apart (r < in), old when r = in."""
from __future__ import annotations

import torch

from .base import BadModule, NetworkType

_A1, _A2, _B1, _B2, _BM = "a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def is_old_layout(parts: dict) -> bool:
    """Whether the module is in the first GLoRA layout (raises BadModule when it fits neither)."""
    a1, a2, b1, b2 = (_flat(parts[p]).shape for p in (_A1, _A2, _B1, _B2))
    new = a1[1] == a2[0] == b1[1] == b2[0]          # each of these is r
    old = a1[0] == a2[1] == b1[0] == b2[1]
    if new and old:
        return b1[0] <= b1[1]        # a square layer: b1 is [r, in] (old) or [out, r] (new), r below in
    if not (new or old):
        raise BadModule(f"GLoRA a1 {list(a1)}, a2 {list(a2)}, b1 {list(b1)}, b2 {list(b2)} share no rank")
    return old


class GLoRA(NetworkType):
    name, title = "glora", "GLoRA"
    algos = ("glora",)
    parts = (_A1, _A2, _B1, _B2, _BM)
    conv_parts = (_BM,)
    main_part = _B2
    needs_base = True
    layouts = ("glora_v1",)

    def detect(self, parts):
        return _A1 in parts or _B1 in parts

    def check(self, parts):
        self.need(parts, _A1, _A2, _B1, _B2)
        flat = [p for p in (_A1, _A2, _B1, _B2) if parts[p].ndim < 2]
        if flat or (_BM in parts and parts[_BM].ndim != 4):
            shapes = ", ".join(f"{p} {list(parts[p].shape)}" for p in (*flat, _BM) if p in parts)
            raise BadModule(f"GLoRA factors are matrices (a Tucker core bm 4-d): {shapes}")
        if is_old_layout(parts) and _BM in parts:
            raise BadModule("a GLoRA module in the first layout has no Tucker core (bm)")

    def rank(self, parts):
        return int(parts[_A1].shape[0] if is_old_layout(parts) else parts[_A2].shape[0])

    def is_conv(self, parts):
        return not is_old_layout(parts) and super().is_conv(parts)

    def fits(self, parts, shape):
        out, rest = shape[0], shape[1:]
        flat_in = int(torch.Size(rest).numel())
        a1, a2, b1, b2 = (_flat(parts[p]).shape for p in (_A1, _A2, _B1, _B2))
        if is_old_layout(parts):
            return b2[0] == out and b1[1] == flat_in and a2[0] == flat_in == shape[1]
        b_in = b2[1] * (parts[_BM][0, 0].numel() if _BM in parts else 1)
        return b1[0] == out and b_in == flat_in and a1[0] == shape[1] == a2[1]

    def delta_on(self, parts, scale, shape, base, alpha):
        a1, a2, b1, b2 = (_flat(parts[p]) for p in (_A1, _A2, _B1, _B2))
        if is_old_layout(parts):
            return (b2 @ b1 + _flat(base) @ a2 @ a1).reshape(shape)
        from .. import functional as fn
        b = fn.lora_weight_delta(parts[_B1], parts[_B2], 1.0, parts.get(_BM)).reshape(shape)
        # A acts on W0's input channels, the kernel's positions untouched; through the rank first (out*in*r
        # products, not the in*in matrix a1 @ a2 times every kernel position)
        a = torch.einsum("or...,rj->oj...", torch.einsum("oi...,ir->or...", base, a1), a2)
        return (a + b) * scale

    def example(self, shape, noise, bias=None, layout=""):
        """Rank 4, in LyCORIS's layout (a1 [in, r], a2 [r, in], b1 [out, r], b2 [r, in, kh, kw]) or the first
        one (`glora_v1`: a1 [r, in], a2 [in, r], b1 [r, in], b2 [out, r]; Linear and 1x1 layers only)."""
        out, inp = shape[0], shape[1]
        if layout == "glora_v1":
            if len(shape) == 4 and shape[2] * shape[3] > 1:
                return None
            return {_A1: noise(4, inp), _A2: noise(inp, 4), _B1: noise(4, inp), _B2: noise(out, 4),
                    "alpha": torch.tensor(4.0)}
        kernel = tuple(shape[2:])
        ones = (1,) * len(kernel)
        return {_A1: noise(inp, 4, *ones), _A2: noise(4, inp, *ones), _B1: noise(out, 4, *ones),
                _B2: noise(4, inp, *kernel), "alpha": torch.tensor(2.0)}
