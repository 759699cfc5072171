"""Frozen fp32 convolutions on the CPU, each on the faster of torch's two CPU kernels for its shape. oneDNN,
torch's default, is the faster on most of SD's layers, but its direct convolution is 2-4x slower than torch's
im2col + GEMM kernel (thnn) where a deep reduction meets a small image: the 1280-channel 3x3 layers at 16x16 and
below, SD1.5's lower levels at 256 and 512 px (1280 -> 1280 at 8x8: 43 vs 18 ms forward + input gradient, fp32,
2-core Xeon; `bench/cpu_conv.py` measures each shape). The choice is a fixed rule of the shape, not a timing
(as cudnn.benchmark's): a run and its resumed continuation then compute the same bits. Half dtypes stay on
oneDNN: thnn's bf16 is tens of times slower."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

# thnn where the GEMM's reduction (in channels x kernel) is at least this deep...
MIN_REDUCTION = 4096
# ...and this many times the output's pixels per image (measured: 1280 ch 3x3 at 16x16 has 45x, 0.5-0.8 of
# oneDNN's time; at 32x32, 11x, a tie; 640 ch at 16x16, 22x, a tie)
REDUCTION_PER_PIXEL = 40


def _onednn(x, layer):
    return F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding)


def _thnn(x, layer):
    return torch.ops.aten.thnn_conv2d(x, layer.weight, list(layer.kernel_size), layer.bias, list(layer.stride),
                                      list(layer.padding))


KERNELS = {"onednn": _onednn, "thnn": _thnn}


def _out_pixels(size: int, layer, dim: int) -> int:
    k, s, p = layer.kernel_size[dim], layer.stride[dim], layer.padding[dim]
    return (size + 2 * p - k) // s + 1


def kernel_name(x_shape, layer) -> str:
    """The kernel for an fp32 input of `x_shape` (N, C, H, W) through a plain frozen fp32 `layer`."""
    c, kh, kw = layer.weight.shape[1:]
    reduction = c * kh * kw
    pixels = _out_pixels(x_shape[-2], layer, 0) * _out_pixels(x_shape[-1], layer, 1)
    deep = reduction >= MIN_REDUCTION and reduction >= REDUCTION_PER_PIXEL * pixels
    return "thnn" if deep else "onednn"


class Chooser:
    """Routes each call; remembers, for one run's summary, which kernel each (input, layer) shape went to."""

    def __init__(self):
        self.choices = {}

    def forward(self, layer, x):
        if x.device.type != "cpu" or x.dtype != torch.float32 or layer.weight.dtype != torch.float32 \
                or layer.weight.requires_grad:      # half dtypes (autocast, held weights) and trained weights
            return _onednn(x, layer)
        key = (tuple(x.shape), tuple(layer.weight.shape), layer.stride, layer.padding)
        name = self.choices[key] = kernel_name(x.shape, layer)
        return KERNELS[name](x, layer)

    def summary(self) -> str | None:
        fast = sum(v == "thnn" for v in self.choices.values())
        if not fast:
            return None
        return (f"CPU convolutions: {fast} of {len(self.choices)} layer shapes ran on torch's GEMM kernel "
                "(faster than oneDNN for deep layers at small sizes)")


def _plain(m) -> bool:
    """A Conv2d thnn computes the same: zero padding given in numbers, no dilation or groups."""
    return (isinstance(m, nn.Conv2d) and m.groups == 1 and tuple(m.dilation) == (1, 1)
            and m.padding_mode == "zeros" and not isinstance(m.padding, str) and m.weight.dtype == torch.float32)


def conv_patches(root, chooser: Chooser) -> list:
    """(layer, forward) for a HostSession: every plain fp32 Conv2d under `root` (whether its weight is frozen
    is asked at each call: the session freezes it after the patches are made)."""
    return [(m, functools.partial(chooser.forward, m)) for m in root.modules() if _plain(m)]
