"""Full / diff (LyCORIS's algo=full, and full fine-tunes stored as differences): the weight change itself,
`diff` (the layer's shape) and, where the layer has a bias, `diff_b`. No rank, so no alpha scale (the built-in
and LyCORIS apply none)."""
from __future__ import annotations

import math

from .base import StoredChange


class Full(StoredChange):
    name, title = "full", "full (diff)"
    algos = ("full",)
    parts = ("diff", "diff_b")
    main_part = "diff"

    def fits(self, parts, shape):
        diff = parts["diff"]
        return diff.shape[0] == shape[0] and diff.numel() == math.prod(shape)
