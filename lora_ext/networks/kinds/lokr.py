"""LoKr (LyCORIS): the Kronecker product of two factors, each full or low-rank (the second optionally CP)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import functional as fn
from .base import NetworkType
from .trainable import TrainedModule


class LoKr(NetworkType):
    name, title = "lokr", "LoKr"
    algos = ("lokr",)
    help = "LoKr: a Kronecker product, the smallest files (factor=4 to 16 in the args; -1 = balanced)."
    parts = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    conv_parts = ("lokr_t2",)
    main_part = "lokr_w2"

    def check(self, parts):
        if "lokr_w1" not in parts:
            self.need(parts, "lokr_w1_a", "lokr_w1_b")
        if "lokr_w2" not in parts:
            self.need(parts, "lokr_w2_a", "lokr_w2_b")

    def rank(self, parts):
        """The low-rank factors' rank; None when both factors are full (then alpha does not scale it)."""
        for k in ("lokr_w1_b", "lokr_w2_b"):
            if k in parts:
                return int(parts[k].shape[0])
        return None

    def fits(self, parts, shape):
        """The Kronecker product's size: rows w1 x w2, columns w1 x w2 (a kxk kernel rides in w2's)."""
        g = parts.get
        rows1, cols1 = g("lokr_w1").shape if "lokr_w1" in parts else (g("lokr_w1_a").shape[0], g("lokr_w1_b").shape[1])
        if "lokr_w2" in parts:
            rows2, cols2 = g("lokr_w2").shape[0], math.prod(g("lokr_w2").shape[1:])
        elif "lokr_t2" in parts:
            rows2, cols2 = g("lokr_w2_a").shape[1], g("lokr_w2_b").shape[1] * math.prod(g("lokr_t2").shape[2:])
        else:
            rows2, cols2 = g("lokr_w2_a").shape[0], g("lokr_w2_b").shape[1]
        return (rows1 * rows2, cols1 * cols2) == (shape[0], math.prod(shape[1:]))

    def delta(self, parts, scale, shape):
        w1 = fn.lokr_factor(parts.get("lokr_w1"), parts.get("lokr_w1_a"), parts.get("lokr_w1_b"))
        w2 = fn.lokr_factor(parts.get("lokr_w2"), parts.get("lokr_w2_a"), parts.get("lokr_w2_b"), parts.get("lokr_t2"))
        return fn.lokr_weight_delta(w1, w2, scale, shape)

    def trainable(self):
        return LoKrModule


class LoKrModule(TrainedModule):
    """kron(w1, w2), LyCORIS's layout: out = a*b and in = c*d split by `factorize` (with `factor`); w1 [a, c] is
    full (low-rank w1_a @ w1_b with `decompose_both` when the rank is below half its size), w2 [b, d(, kernel)]
    low-rank w2_a @ w2_b (or with `tucker` a CP core t2) unless the rank reaches half its size or
    `full_matrix` asks, then full. Kaiming-uniform init, the last factor zero (a fresh module changes nothing).
    With both factors full alpha does not scale it (scale 1)."""
    network = "lokr"

    def build(self, geo, rank, opts):
        # a, c: the small halves (w1); b, d: the large ones (w2)
        (a, b), (c, d) = fn.factorize(geo.out, opts.factor), fn.factorize(geo.inp, opts.factor)
        k = geo.kernel
        w1_low = opts.decompose_both and rank < max(a, c) / 2 and not opts.full_matrix
        self.w2_full = opts.full_matrix or rank >= max(b, d) / 2
        self.tucker = opts.tucker and geo.kxk and not self.w2_full
        if w1_low:
            self.lokr_w1_a, self.lokr_w1_b = nn.Parameter(torch.empty(a, rank)), nn.Parameter(torch.empty(rank, c))
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c))
        if self.w2_full:
            self.lokr_w2 = nn.Parameter(torch.empty(b, d, *k))
        elif self.tucker:
            self.lokr_t2 = nn.Parameter(torch.empty(rank, rank, *k))
            self.lokr_w2_a, self.lokr_w2_b = nn.Parameter(torch.empty(rank, b)), nn.Parameter(torch.empty(rank, d))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, rank))
            self.lokr_w2_b = nn.Parameter(torch.empty(rank, d * math.prod(k)))
        for p in self.parameters(recurse=False):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        nn.init.zeros_(self.lokr_w2 if self.w2_full else self.lokr_w2_b)
        if self.w2_full and not w1_low:
            self.scale = 1.0        # no low-rank factor: alpha has nothing to scale (as the files read back)
            self.alpha.fill_(rank)

    def raw_delta(self):
        g = lambda n: getattr(self, n, None)  # noqa: E731
        w1 = fn.lokr_factor(g("lokr_w1"), g("lokr_w1_a"), g("lokr_w1_b"))
        w2 = fn.lokr_factor(g("lokr_w2"), g("lokr_w2_a"), g("lokr_w2_b"), g("lokr_t2"))
        return fn.lokr_weight_delta(w1, w2, 1.0, self.geo.shape)
