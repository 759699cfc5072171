"""Frozen layers whose weights are stored in a narrower dtype than the run computes in. A headless run on a
CPU without bf16 instructions, asked for bf16 / fp16, loads the frozen UNet and text-encoder weights so (half
their memory) and computes in fp32, the CPU's fast path; an fp32 run holds them as the file stores them (an
fp16 file: fp16, the same values as fp32 copies). Each use casts the layer's weight up to its input's
dtype. Backward keeps the stored weight and casts it again, not the cast copy: autograd would otherwise keep
an fp32 copy of every layer from its forward to its backward, the memory saved spent again."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_conv


class _Scratch:
    """One buffer every patched layer casts its weight into, each for the time of its own op. A fresh cast per
    use would take new memory each time, and its page faults cost more than the cast (measured: 6x for
    1.2 GB of SD1.5 convolution weights)."""

    def __init__(self):
        self.buf = torch.empty(0)

    def cast(self, weight, dtype):
        if self.buf.numel() < weight.numel() or self.buf.dtype != dtype or self.buf.device != weight.device:
            self.buf = torch.empty(weight.numel(), dtype=dtype, device=weight.device)
        return self.buf[:weight.numel()].view(weight.shape).copy_(weight)


class _StoredNarrow(torch.autograd.Function):
    """A frozen Linear (conv None) or Conv2d (conv: its stride/padding/dilation/groups) on a narrow weight;
    `gemm`: the Conv2d, deep at a small size, on torch's GEMM kernel forward and backward (train.cpu_conv's
    rule; what an fp32 run computes there, as autograd runs thnn's own backward after its forward. Against
    oneDNN's input gradient, the layer's forward + input gradient took 0.37-0.90x the time: bench/cpu_conv.py
    on both, 2-core EPYC). That backward takes the layer's input, small where the rule picks the GEMM."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv, scratch, gemm=None):
        ctx.save_for_backward(weight, *(() if gemm is None else (x,)))
        ctx.conv, ctx.shape, ctx.scratch, ctx.gemm = conv, x.shape, scratch, gemm
        w, b = scratch.cast(weight, x.dtype), None if bias is None else bias.to(x.dtype)
        if gemm is not None:
            return cpu_conv.thnn(x, w, b, gemm)
        return F.linear(x, w, b) if conv is None else F.conv2d(x, w, b, **conv)

    @staticmethod
    def backward(ctx, grad):
        weight, *x = ctx.saved_tensors
        w = ctx.scratch.cast(weight, grad.dtype)
        if ctx.conv is None:
            dx = grad @ w
        elif ctx.gemm is not None:
            dx = cpu_conv.thnn_input_grad(grad, x[0], w, ctx.gemm)
        else:
            dx = torch.nn.grad.conv2d_input(ctx.shape, w, grad, **ctx.conv)
        return dx, None, None, None, None, None


def _forward(layer, scratch, x):
    weight, bias = layer.weight, layer.bias
    conv = (None if isinstance(layer, nn.Linear) else
            dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups))
    trained = weight.requires_grad or (bias is not None and bias.requires_grad)
    if trained or (conv is not None and (layer.padding_mode != "zeros" or isinstance(layer.padding, str))):
        # a weight-form network's W + delta (autograd must see the cast), or a convolution conv2d_input
        # cannot invert: the plain cast
        w, b = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
        return F.linear(x, w, b) if conv is None else layer._conv_forward(x, w, b)
    gemm = (conv is not None and x.dtype == torch.float32 and cpu_conv.plain(layer)
            and cpu_conv.kernel_name(x.shape, layer) == "gemm")
    return _StoredNarrow.apply(x, weight, bias, conv, scratch, layer if gemm else None)


def upcast_patches(roots, compute=torch.float32) -> list:
    """(layer, forward) for a HostSession: each Linear / Conv2d under `roots` whose weight is stored in
    another floating dtype than `compute` casts it up at use."""
    scratch = _Scratch()
    return [(m, functools.partial(_forward, m, scratch)) for root in roots for m in root.modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.is_floating_point() and m.weight.dtype != compute]


def token_embeddings(roots) -> list:
    """The token embedding tables under `roots` (transformers' CLIP and open_clip both name them so). Stored
    narrow they need no cast at all: a lookup reads a few rows, which the sum with the position embedding
    (kept wide) widens (SD1.5's table: 76 MB in fp16 instead of 152 MB in fp32)."""
    return [m.weight for root in roots for name, m in root.named_modules()
            if isinstance(m, nn.Embedding) and name.rsplit(".", 1)[-1] == "token_embedding"]
