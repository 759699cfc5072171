"""Values users type or send: a LoRA's weight (a panel slot's, a merge ratio) and an on/off flag; one check
each for the panel, the API, X/Y/Z, infotext, merges and the training options."""
from __future__ import annotations

import math

MAX_WEIGHT = 100.0      # far past any useful weight; beyond it fp16 weights overflow


def weight_value(value, what: str) -> float:
    """`value` as a float; ValueError naming `what` unless it is a finite number within +-MAX_WEIGHT (a NaN
    weight turns every image black, a huge one overflows the half-precision weights)."""
    if isinstance(value, bool):
        raise ValueError(f"{what} {value!r} is not a number")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {_shown(value)} is not a number") from None
    except OverflowError:           # an integer of hundreds of digits (JSON allows it)
        raise ValueError(f"{what} {_shown(value)} must be a finite number from -{MAX_WEIGHT:g} to "
                         f"{MAX_WEIGHT:g}") from None
    if not math.isfinite(x) or abs(x) > MAX_WEIGHT:
        raise ValueError(f"{what} {value!r} must be a finite number from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}")
    return x


TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


def flag_value(value, what: str) -> bool:
    """`value` as on/off: a bool, 0 or 1, or one of the words true/false, yes/no, on/off, 1/0 (any case; '' is
    off). Anything else raises ValueError naming `what`: `bool("false")` is True, so a string is never
    taken by its truth."""
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise ValueError(f"{what} {_shown(value)} is not true or false")


def _shown(value) -> str:
    """The value as a message shows it: a long one cut (a 400-digit number, a pasted file)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def number(v, kind):
    """`v` (a string, or a number) as `kind` (int or float); ValueError unless it is one (an int must be
    whole; a bool is no number)."""
    if isinstance(v, bool):
        raise ValueError(v)
    x = float(v)
    if kind is int:
        if not math.isfinite(x) or x != int(x):
            raise ValueError(v)
        return int(x)
    return x


def out_of_range(name: str, v, lo, hi) -> str | None:
    """What is wrong with option `name` = `v` against its bounds (None: no bound), or None when nothing is."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return f"{name} = {v!r} is not a finite number"
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
        return f"{name} = {v:g} is out of range ({bounds})"
    return None
