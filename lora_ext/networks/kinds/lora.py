"""LoRA and LoCon (kohya's networks.lora, LyCORIS's locon): up @ down, a kxk kernel in down or in a CP core."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import functional as fn
from .base import BadModule, NetworkType
from .trainable import TrainedModule


class LoRA(NetworkType):
    name, title = "lora", "LoRA"
    algos = ("lora", "locon")
    help = ("LoRA: the guide's type, small and fast. LoCon: LoRA on the 3x3 convolutions too, often better for "
            "styles (conv_dim=8 conv_alpha=4 in the args).")
    factored = True
    parts = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
    conv_parts = ("lora_mid.weight",)
    main_part = "lora_down.weight"

    def detect(self, parts):
        return "lora_down.weight" in parts or "lora_up.weight" in parts

    def check(self, parts):
        self.need(parts, "lora_down.weight", "lora_up.weight")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        if up.ndim < 2 or down.ndim < 2 or up.shape[1] != down.shape[0]:
            raise BadModule(f"lora_up {list(up.shape)} and lora_down {list(down.shape)} disagree on the rank")

    def rank(self, parts):
        return int(parts["lora_down.weight"].shape[0])

    def delta(self, parts, scale, shape):
        return fn.lora_weight_delta(parts["lora_up.weight"], parts["lora_down.weight"], scale, parts.get("lora_mid.weight"))

    def out_in(self, parts):
        return int(parts["lora_up.weight"].shape[0]), int(parts["lora_down.weight"].shape[1])

    def low_rank(self, parts):
        if "lora_mid.weight" in parts:
            return None
        return parts["lora_up.weight"], parts["lora_down.weight"]

    def trainable(self):
        return LoRAModule


class LoRAModule(TrainedModule):
    """kohya's LoRA module (LoCon on a kxk conv): `lora_down` takes the layer's input (for a conv: its kernel,
    stride and padding; with a Tucker core, 1x1, and `lora_mid` the kernel), `lora_up` is Linear / 1x1; down
    (and mid) initialised kaiming-uniform, up with zeros, so a fresh module changes nothing."""
    network = "lora"

    def build(self, geo, rank, opts):
        if geo.conv is None:
            self.lora_down = nn.Linear(geo.inp, rank, bias=False)
            self.lora_up = nn.Linear(rank, geo.out, bias=False)
        else:
            tucker = opts.tucker and geo.kxk
            self.lora_down = nn.Conv2d(geo.inp, rank, 1 if tucker else geo.kernel, bias=False,
                                       **({} if tucker else geo.conv))
            if tucker:
                self.lora_mid = nn.Conv2d(rank, rank, geo.kernel, bias=False, **geo.conv)
            self.lora_up = nn.Conv2d(rank, geo.out, 1, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        if hasattr(self, "lora_mid"):
            nn.init.kaiming_uniform_(self.lora_mid.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def raw_delta(self):
        mid = self.lora_mid.weight if hasattr(self, "lora_mid") else None
        return fn.lora_weight_delta(self.lora_up.weight, self.lora_down.weight, 1.0, mid)

    @property
    def forms_weight(self):
        return self.dora

    def forward(self, x, base=None):
        """up(down(x)) without forming delta W (DoRA needs the merged weight: the common path)."""
        if self.dora:
            return super().forward(x, base)
        if self.dropped():
            return torch.zeros((), dtype=x.dtype, device=x.device)
        h = self.lora_down(x)
        if hasattr(self, "lora_mid"):
            h = self.lora_mid(h)
        scale = self.scale
        if self.training and self.opts.dropout:
            h = nn.functional.dropout(h, p=self.opts.dropout)
        if self.training and self.opts.rank_dropout:
            # drop whole ranks per sample, rescaled as if the rank had been smaller (kohya's rank dropout)
            mask = (torch.rand(h.shape[0], self.rank, device=h.device) > self.opts.rank_dropout).to(h.dtype)
            h = h * mask.view(h.shape[0], *([1] * (h.ndim - 2)), self.rank).movedim(-1, 1 if self.geo.conv else -1)
            scale = scale / (1.0 - self.opts.rank_dropout)
        return self.lora_up(h) * scale
