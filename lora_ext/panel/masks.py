"""Regional masks: where a slot's LoRA paints. A mask arrives as a PNG (or any image PIL reads), as base64 or
a data URL (the API's `mask` argument, the panel's upload); white is full strength, black none, grey between.
It is stretched over the image, and at each hooked UNet layer resized to that layer's grid. (torch is imported
where it is used: the panel encodes uploads with this module at UI time.)"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re

MAX_TEXT = 48 << 20         # base64 characters: a 32 MB image file
MAX_PIXELS = 64 << 20       # width x height, checked before the pixels are decoded
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


class Mask:
    """A mask's pixels (H, W) in [0, 1], and its resized copies per layer grid."""

    def __init__(self, pixels):
        self.pixels = pixels
        self.digest = hashlib.sha256(pixels.numpy().tobytes()).hexdigest()[:8]
        self._sized: dict = {}

    @property
    def label(self) -> str:
        """What the infotext says of it: size and a digest of its pixels (the pixels do not fit there)."""
        h, w = self.pixels.shape
        return f"{w}x{h} #{self.digest}"

    def at(self, height: int, width: int, like):
        """(height, width) of the mask in `like`'s dtype and device (area average when shrinking)."""
        key = (height, width, like.device, like.dtype)
        sized = self._sized.get(key)
        if sized is None:
            from torch.nn import functional as F

            src = self.pixels[None, None]
            shrink = height <= src.shape[2] and width <= src.shape[3]
            sized = F.interpolate(src, size=(height, width), mode="area") if shrink else \
                F.interpolate(src, size=(height, width), mode="bilinear", align_corners=False)
            sized = self._sized[key] = sized[0, 0].clamp(0, 1).to(like.device, like.dtype)
        return sized

    def over(self, output, latent: tuple | None):
        """The mask shaped to multiply a layer's output: (B, C, H, W) maps take it as (1, 1, H, W); token
        sequences (B, N, C) of a grid of the latent (h, w) halved k times (ceil, as the UNet's downsamplers do)
        as (1, N, 1). None where the output is no grid of the latent."""
        if output.ndim == 4:
            return self.at(output.shape[2], output.shape[3], output)[None, None]
        if output.ndim == 3 and latent is not None:
            h, w = latent
            for _ in range(6):
                if h * w == output.shape[1]:
                    return self.at(h, w, output).reshape(1, -1, 1)
                h, w = -(-h // 2), -(-w // 2)
        return None


def decode(text: str) -> Mask:
    """A mask from base64 / a data URL of an image file; ValueError says what is wrong with it."""
    from PIL import Image, UnidentifiedImageError

    text = str(text).strip()
    if len(text) > MAX_TEXT:
        raise ValueError(f"the mask is {len(text) >> 20} MB of text; at most {MAX_TEXT >> 20} MB")
    try:
        data = base64.b64decode(_DATA_URL.sub("", text, count=1), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the mask is not base64 (send a PNG as base64 or a data:image/png;base64,... URL)") from None
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_PIXELS or min(image.size) < 1:
            raise ValueError(f"the mask is {image.width}x{image.height}; at most {MAX_PIXELS >> 20} megapixels")
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError):
        raise ValueError("the mask is not an image PIL can read (send a PNG)") from None
    return from_image(image)


def from_image(image) -> Mask:
    """A mask from a PIL image: its luminance, times its alpha where it has one (a transparent area paints
    nothing)."""
    import numpy as np
    import torch

    if image.mode.startswith("I"):      # 16-bit grey (PNG reads as I;16 or I): convert("L") would clip it
        grey = np.clip(np.asarray(image, dtype=np.float32) / 65535, 0, 1)
    elif image.mode == "F":             # float pixels: fractions already
        grey = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float32), nan=-1.0), -1, 1)
    else:
        grey = np.asarray(image.convert("L"), dtype=np.float32) / 255
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        grey = grey * (np.asarray(image.convert("RGBA"), dtype=np.float32)[..., 3] / 255)
    pixels = torch.from_numpy(np.ascontiguousarray(grey))
    if not torch.isfinite(pixels).all() or bool((pixels < 0).any()):
        raise ValueError("the mask has pixels that are not numbers")
    return Mask(pixels)


def encode(image) -> str:
    """A PIL image (or an array of one) as a data URL of a PNG: how the panel hands its upload on."""
    import numpy as np
    from PIL import Image

    if image is None:
        return ""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
