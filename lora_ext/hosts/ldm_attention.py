"""torch's scaled_dot_product_attention for ldm's CrossAttention, for training outside the webui: ldm's own
forward materialises every attention matrix (slow, and the largest memory of a training step). Inside the
webui its hijack has already replaced that forward with the optimisation the user chose; then we leave it."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _sdpa_forward(self, x, context=None, mask=None, attention=F.scaled_dot_product_attention, **extra):
    # sgm's CrossAttention (SDXL in the webui) also takes additional_tokens and n_times_crossframe_attn_in_self;
    # anything beyond plain attention runs the module's own forward
    if mask is not None or any(v for v in extra.values()):
        return type(self).forward(self, x, context, mask, **extra)
    h = self.heads
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    b, n, _ = q.shape
    q, k, v = (t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
    out = attention(q, k, v)
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


class _FusedAttentionShapes(torch.autograd.Function):
    """Shapes only (for memory estimates on meta tensors): what a fused attention kernel (flash or
    memory-efficient SDPA, xformers) keeps for backward: q, k, v, the output and one float per query row,
    never the attention matrix that the unfused path would save."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        ctx.save_for_backward(q, k, v, out, torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device))
        return out

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("shapes only: this attention is for memory estimates, not for training")


def _diffusers_shapes_forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
    """diffusers' Attention as its SDPA processor computes it in a UNet's transformer blocks (3-d input, no
    mask, norms or residual), with the fused attention's shapes; anything else runs the module's own forward."""
    plain = (attention_mask is None and hidden_states.ndim == 3 and getattr(self, "group_norm", None) is None
             and getattr(self, "spatial_norm", None) is None and not getattr(self, "norm_cross", None)
             and not getattr(self, "residual_connection", False) and getattr(self, "norm_q", None) is None)
    if not plain:
        return type(self).forward(self, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    q, k, v = self.to_q(hidden_states), self.to_k(context), self.to_v(context)
    b, n, _ = q.shape
    q, k, v = (t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
    out = _FusedAttentionShapes.apply(q, k, v).transpose(1, 2).reshape(b, n, -1)
    for layer in self.to_out:
        out = layer(out)
    return out / self.rescale_output_factor


def fused_attention_shape_patches(root) -> list:
    """(module, forward) for every ldm/sgm CrossAttention and diffusers Attention under `root`, whatever
    forward the host installed (the webui's hijack may use xformers, which meta tensors cannot run)."""
    patches = []
    for m in root.modules():
        if type(m).__name__ == "CrossAttention" and hasattr(m, "to_q"):
            patches.append((m, functools.partial(_sdpa_forward, m, attention=_FusedAttentionShapes.apply)))
        elif type(m).__name__ == "Attention" and hasattr(m, "to_q") and isinstance(getattr(m, "to_out", None), torch.nn.ModuleList):
            patches.append((m, functools.partial(_diffusers_shapes_forward, m)))
    return patches
