"""LoHa (LyCORIS): the Hadamard product of two low-rank products, optionally with CP cores for kxk kernels."""
from __future__ import annotations

from .. import functional as fn
from .base import BadModule, NetworkType


class LoHa(NetworkType):
    name, title = "loha", "LoHa"
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

    def out_in(self, parts):
        if "hada_t1" in parts:
            return None
        return int(parts["hada_w1_a"].shape[0]), int(parts["hada_w1_b"].shape[1])
