"""kohya's --color_aug (train_util.AugHelper.color_aug), on an 8-bit RGB image after its resize and crop: in a
third of the draws either the hue is turned by up to 8 of OpenCV's 180 hue steps (an 8-bit HSV round trip), or
each channel value x becomes x ** gamma, gamma from 0.95 to 1.05, on the 0-255 values themselves (kohya's
formula: it brightens or darkens more than a gamma on 0-1 would), cut to 0-255."""
from __future__ import annotations

import random

import numpy as np

HUE_STEPS = 8


def apply(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """`image`: uint8 [h, w, 3] RGB; a new array (or the same one, when this draw changes nothing)."""
    if rng.random() > 0.33:
        return image
    if rng.random() > 0.5:
        shift = rng.uniform(-HUE_STEPS, HUE_STEPS)
        if shift < 0:
            shift += 180
        hsv = _hsv(image)
        hsv[..., 0] = ((hsv[..., 0] + shift) % 180).astype(np.uint8)       # kohya adds a float to uint8 hues
        return _rgb(hsv)
    gamma = rng.uniform(0.95, 1.05)
    return np.clip(image.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)


def _hsv(rgb: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit HSV: H in 0-179 (degrees / 2), S and V in 0-255."""
    x = rgb.astype(np.float64)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(axis=-1)
    delta = v - x.min(axis=-1)
    s = np.where(v > 0, delta / np.where(v > 0, v, 1) * 255, 0)
    safe = np.where(delta > 0, delta, 1)
    h = np.where(v == r, 60 * (g - b) / safe, np.where(v == g, 120 + 60 * (b - r) / safe, 240 + 60 * (r - g) / safe))
    h = np.where(delta > 0, h % 360, 0)
    out = np.stack([np.round(h / 2) % 180, np.round(s), v], axis=-1)
    return out.astype(np.uint8)


def _rgb(hsv: np.ndarray) -> np.ndarray:
    h = hsv[..., 0].astype(np.float64) * 2
    s = hsv[..., 1].astype(np.float64) / 255
    v = hsv[..., 2].astype(np.float64)
    c = v * s
    k = (h / 60) % 6
    x = c * (1 - np.abs(k % 2 - 1))
    zeros = np.zeros_like(c)
    sector = np.floor(k).astype(int)
    r = np.choose(sector, [c, x, zeros, zeros, x, c])
    g = np.choose(sector, [x, c, c, x, zeros, zeros])
    b = np.choose(sector, [zeros, zeros, x, c, c, x])
    m = v - c
    return np.clip(np.round(np.stack([r + m, g + m, b + m], axis=-1)), 0, 255).astype(np.uint8)
