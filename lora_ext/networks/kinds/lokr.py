"""LoKr (LyCORIS): the Kronecker product of two factors, each full or low-rank (the second optionally CP)."""
from __future__ import annotations

from .. import functional as fn
from .base import NetworkType


class LoKr(NetworkType):
    name, title = "lokr", "LoKr"
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

    def delta(self, parts, scale, shape):
        w1 = fn.lokr_factor(parts.get("lokr_w1"), parts.get("lokr_w1_a"), parts.get("lokr_w1_b"))
        w2 = fn.lokr_factor(parts.get("lokr_w2"), parts.get("lokr_w2_a"), parts.get("lokr_w2_b"), parts.get("lokr_t2"))
        return fn.lokr_weight_delta(w1, w2, scale, shape)
