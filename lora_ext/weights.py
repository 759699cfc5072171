"""A LoRA's weight (a panel slot's, a merge ratio): one check for the panel, merges and merge-LoRAs."""
from __future__ import annotations

import math

MAX_WEIGHT = 100.0      # far past any useful weight; beyond it fp16 weights overflow


def weight_value(value, what: str) -> float:
    """`value` as a float; ValueError naming `what` unless it is a finite number within +-MAX_WEIGHT (a NaN
    weight turns every image black, a huge one overflows the half-precision weights)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {value!r} is not a number") from None
    if not math.isfinite(x) or abs(x) > MAX_WEIGHT:
        raise ValueError(f"{what} {value!r} must be a finite number from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}")
    return x
