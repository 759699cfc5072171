"""Norm (LyCORIS's norm modules, with train_norm): a change to a GroupNorm / LayerNorm's scale `w_norm` and
shift `b_norm`, one value per channel; no rank, no alpha scale."""
from __future__ import annotations

import math

from .base import StoredChange


class Norm(StoredChange):
    name, title = "norm", "norm"
    parts = ("w_norm", "b_norm")
    main_part = "w_norm"

    def is_conv(self, parts):
        return False

    def fits(self, parts, shape):
        return len(shape) == 1 and parts["w_norm"].numel() == math.prod(shape)
