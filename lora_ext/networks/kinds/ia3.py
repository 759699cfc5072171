"""IA3 (LyCORIS): one learned factor per output channel (or, `on_input`, per input channel) that scales the
layer's own weight: the change is W0 * w along that axis."""
from __future__ import annotations

import torch

from .base import BadModule, NetworkType


class IA3(NetworkType):
    name, title = "ia3", "IA3"
    algos = ("ia3",)
    parts = ("weight", "on_input")
    main_part = "weight"
    needs_base = True

    def detect(self, parts):
        return "weight" in parts and "on_input" in parts

    def example(self, shape, noise, bias=None, layout=""):
        return {"weight": noise(shape[0]), "on_input": torch.tensor(0)}     # one scale per output channel

    def check(self, parts):
        if parts["on_input"].numel() != 1:
            raise BadModule(f"on_input must be one flag, it has shape {list(parts['on_input'].shape)}")

    def is_conv(self, parts):
        return False        # a per-channel factor: nothing in it says kxk

    def _on_input(self, parts) -> bool:
        return bool(parts["on_input"].reshape(()).item())

    def fits(self, parts, shape):
        return parts["weight"].numel() == shape[1 if self._on_input(parts) else 0]

    def delta_on(self, parts, scale, shape, base, alpha):
        # the channel axis of the weight: 1 (input) or 0 (output); the factor broadcast along it. (The built-in
        # reshapes an output factor to [out, 1], which only broadcasts on a Linear; LyCORIS means the channel.)
        axis = 1 if self._on_input(parts) else 0
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return base * parts["weight"].reshape(view) * scale
