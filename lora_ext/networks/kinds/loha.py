"""LoHa (LyCORIS): the Hadamard product of two low-rank products, optionally with CP cores for kxk kernels."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import functional as fn
from .base import BadModule, NetworkType
from .trainable import TrainedModule


class LoHa(NetworkType):
    name, title = "loha", "LoHa"
    algos = ("loha",)
    help = "LoHa: a Hadamard product of two LoRAs, more expressive at the same dim (dim 4-32, alpha 1 to dim)."
    parts = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    conv_parts = ("hada_t1",)
    main_part = "hada_w1_b"

    def check(self, parts):
        self.need(parts, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        for i in ("1", "2"):
            a, b = parts[f"hada_w{i}_a"], parts[f"hada_w{i}_b"]
            if f"hada_t{i}" not in parts and a.shape[1] != b.shape[0]:
                raise BadModule(f"hada_w{i}_a {list(a.shape)} and hada_w{i}_b {list(b.shape)} disagree on the rank")

    def rank(self, parts):
        return int(parts["hada_w1_b"].shape[0])

    def delta(self, parts, scale, shape):
        return fn.loha_weight_delta(parts["hada_w1_a"], parts["hada_w1_b"], parts["hada_w2_a"], parts["hada_w2_b"],
                                    scale, shape, parts.get("hada_t1"), parts.get("hada_t2"))

    def fits(self, parts, shape):
        # without CP cores a kxk kernel is flattened into the b factors' columns
        if "hada_t1" in parts:
            return (parts["hada_w1_a"].shape[1], parts["hada_w1_b"].shape[1]) == (shape[0], shape[1])
        return (parts["hada_w1_a"].shape[0], parts["hada_w1_b"].shape[1]) == (shape[0], math.prod(shape[1:]))

    def out_in(self, parts):
        if "hada_t1" in parts:
            return None
        return int(parts["hada_w1_a"].shape[0]), int(parts["hada_w1_b"].shape[1])

    def trainable(self):
        return LoHaModule


class LoHaModule(TrainedModule):
    """(w1a @ w1b) * (w2a @ w2b), LyCORIS's layout and init: the b factors normal(std 1), w1a normal(std 0.1),
    w2a zeros (a fresh module changes nothing). A kxk conv keeps its kernel flattened into the b factors, or
    with `tucker` in CP cores t1, t2 [rank, rank, kh, kw] (then a [rank, out], b [rank, in])."""
    network = "loha"

    def build(self, geo, rank, opts):
        self.tucker = opts.tucker and geo.kxk
        cols = geo.inp * (1 if self.tucker else math.prod(geo.kernel))
        for i in ("1", "2"):
            if self.tucker:
                setattr(self, f"hada_t{i}", nn.Parameter(torch.empty(rank, rank, *geo.kernel)))
                a = torch.empty(rank, geo.out)
            else:
                a = torch.empty(geo.out, rank)
            setattr(self, f"hada_w{i}_a", nn.Parameter(a))
            setattr(self, f"hada_w{i}_b", nn.Parameter(torch.empty(rank, cols)))
        if self.tucker:
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)

    def raw_delta(self):
        t = (self.hada_t1, self.hada_t2) if self.tucker else (None, None)
        return fn.loha_weight_delta(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, 1.0,
                                    self.geo.shape, *t)
