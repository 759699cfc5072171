"""Frozen convolutions on the CPU, each on the faster of oneDNN and a GEMM kernel for its shape. oneDNN,
torch's default, is the faster on most of SD's layers, but its direct convolution is 2-4x slower than im2col +
GEMM where a deep reduction meets a small image: the 1280-channel 3x3 layers at 16x16 and below (8x8 in bf16),
SD1.5's lower levels at 256 and 512 px (1280 -> 1280 at 8x8, forward + input gradient, 2-core Xeon: fp32 43 vs
18 ms on torch's thnn kernel, bf16 10.5 vs 6 ms on unfold + matmul; `bench/cpu_conv.py` measures each shape).
The choice is a fixed rule of the shape, not a timing (as cudnn.benchmark's): a run and its resumed
continuation then compute the same bits. fp32 uses thnn; bf16 (autocast) unfold + matmul, thnn's bf16 being
tens of times slower."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

# per compute dtype, where the GEMM wins: a reduction (in channels x kernel) at least this deep and this many
# times the output's pixels per image (fp32: 1280 ch 3x3 at 16x16 is 45x, 0.5-0.8 of oneDNN's time; at 32x32,
# 11x, a tie; 640 ch at 16x16, 22x, a tie. bf16: at 8x8, 180x, 0.6; at 16x16, 45x, a tie)
RULES = {torch.float32: (4096, 40), torch.bfloat16: (4096, 150)}


def _onednn(x, layer, dtype=None):
    return F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding)


def thnn(x, weight, bias, layer):
    """torch's im2col + GEMM convolution of `layer`'s geometry on these weights (train.upcast: a cast copy)."""
    return torch.ops.aten.thnn_conv2d(x, weight, list(layer.kernel_size), bias, list(layer.stride),
                                      list(layer.padding))


def thnn_input_grad(grad, x, weight, layer):
    """The input's gradient of `thnn` (what autograd computes after it)."""
    return torch.ops.aten._slow_conv2d_backward(grad, x, weight, list(layer.kernel_size), list(layer.stride),
                                                list(layer.padding), [True, False, False])[0]


def _thnn(x, layer, dtype=None):
    return thnn(x, layer.weight, layer.bias, layer)


def _unfold_mm(x, layer, dtype):
    """im2col and one matmul per image in `dtype` (one batched matmul took 2-19x its time at batch 2, bf16)."""
    n = x.shape[0]
    w = layer.weight.to(dtype).reshape(layer.out_channels, -1)
    cols = F.unfold(x.to(dtype), layer.kernel_size, padding=layer.padding, stride=layer.stride)
    out = torch.stack([w @ c for c in cols.unbind(0)])
    if layer.bias is not None:
        out = out + layer.bias.to(dtype)[:, None]
    return out.view(n, layer.out_channels, _out_size(x.shape[-2], layer, 0), _out_size(x.shape[-1], layer, 1))


GEMM = {torch.float32: _thnn, torch.bfloat16: _unfold_mm}


def _out_size(size: int, layer, dim: int) -> int:
    k, s, p = layer.kernel_size[dim], layer.stride[dim], layer.padding[dim]
    return (size + 2 * p - k) // s + 1


def kernel_name(x_shape, layer, dtype=torch.float32) -> str:
    """"gemm" or "onednn", for an input of `x_shape` (N, C, H, W) through a plain frozen `layer` in `dtype`."""
    if dtype not in RULES:
        return "onednn"
    least, per_pixel = RULES[dtype]
    c, kh, kw = layer.weight.shape[1:]
    reduction = c * kh * kw
    pixels = _out_size(x_shape[-2], layer, 0) * _out_size(x_shape[-1], layer, 1)
    return "gemm" if reduction >= least and reduction >= per_pixel * pixels else "onednn"


class Chooser:
    """Routes each call; remembers, for one run's summary, which kernel each (input, layer, dtype) went to."""

    def __init__(self):
        self.choices = {}

    def forward(self, layer, x):
        autocast = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu") if autocast else x.dtype     # what the convolution computes in
        if (x.device.type != "cpu" or layer.weight.requires_grad or dtype not in GEMM
                or not autocast and layer.weight.dtype != dtype):
            return _onednn(x, layer)        # trained weights (a weight-form network), or whatever else comes
        key = (tuple(x.shape), tuple(layer.weight.shape), layer.stride, layer.padding, dtype)
        name = self.choices[key] = kernel_name(x.shape, layer, dtype)
        return _onednn(x, layer) if name == "onednn" else GEMM[dtype](x, layer, dtype)

    def summary(self) -> str | None:
        fast = sum(v == "gemm" for v in self.choices.values())
        if not fast:
            return None
        return (f"CPU convolutions: {fast} of {len(self.choices)} layer shapes ran on a GEMM kernel (faster than "
                "oneDNN for deep layers at small sizes)")


def plain(m) -> bool:
    """A Conv2d the GEMM kernels compute the same: zero padding given in numbers, no dilation or groups."""
    return (isinstance(m, nn.Conv2d) and m.groups == 1 and tuple(m.dilation) == (1, 1)
            and m.padding_mode == "zeros" and not isinstance(m.padding, str))


def conv_patches(root, chooser: Chooser) -> list:
    """(layer, forward) for a HostSession: every plain fp32 / bf16 Conv2d under `root` (whether its weight is
    frozen, and in what it computes, is asked at each call: the session freezes and holds the weights after the
    patches are made)."""
    return [(m, functools.partial(chooser.forward, m)) for m in root.modules() if plain(m) and m.weight.dtype in GEMM]
