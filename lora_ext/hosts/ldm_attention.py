"""torch's scaled_dot_product_attention for ldm's CrossAttention, for training outside the webui: ldm's own
forward materialises every attention matrix (slow, and the largest memory of a training step). Inside the
webui its hijack has already replaced that forward with the optimisation the user chose; then we leave it."""
from __future__ import annotations

import torch.nn.functional as F


def _sdpa_forward(self, x, context=None, mask=None):
    if mask is not None:
        return type(self).forward(self, x, context, mask)
    h = self.heads
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    b, n, _ = q.shape
    q, k, v = (t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def sdpa_patches(root) -> list:
    """(module, forward) for every ldm CrossAttention under `root` still using ldm's own forward."""
    patches = []
    for m in root.modules():
        forward = type(m).__dict__.get("forward")
        if (type(m).__name__ == "CrossAttention" and forward is not None
                and getattr(forward, "__module__", "") == "ldm.modules.attention"):
            patches.append((m, _sdpa_forward.__get__(m)))
    return patches
