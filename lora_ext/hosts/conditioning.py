"""What a UNet is conditioned on, host-agnostic. SD1/SD2: the per-token text states. SDXL adds a vector
(into the UNet's `label_emb`): the second text encoder's pooled, projected output, then the image's
original size, its crop's top-left corner and the target size, each number as a sinusoidal embedding (sgm's
ConcatTimestepEmbedderND: cos half then sin half), all (height, width) ordered as sgm and kohya record them.

Text and size are kept apart (`Text`, then `condition`) so that text-encoder outputs can be cached per
caption while the sizes come per image."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Size:
    """sgm's `original_size_as_tuple`, `crop_coords_top_left`, `target_size_as_tuple`: (h, w), (top, left), (h, w)."""
    original_hw: tuple
    crop_top_left: tuple
    target_hw: tuple

    @classmethod
    def plain(cls, width: int, height: int) -> "Size":
        """A generation's own size: nothing cropped, original = target (the webui's default)."""
        return cls((height, width), (0, 0), (height, width))

    def numbers(self) -> list:
        return [*self.original_hw, *self.crop_top_left, *self.target_hw]


@dataclass
class Text:
    """Text-encoder outputs of a batch of prompts: per-token states [b, tokens, dim] and, for SDXL, the
    pooled projected output [b, pooled dim] (None otherwise)."""
    tokens: torch.Tensor
    pooled: torch.Tensor | None = None

    def rows(self, index) -> "Text":
        return Text(self.tokens[index], None if self.pooled is None else self.pooled[index])

    @staticmethod
    def cat(parts: list) -> "Text":
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return Text(torch.cat([p.tokens for p in parts]), pooled)

    def zeros(self) -> "Text":
        """sgm's force_zero_embeddings (the webui's empty negative prompt on SDXL)."""
        return Text(torch.zeros_like(self.tokens), None if self.pooled is None else torch.zeros_like(self.pooled))


@dataclass
class Cond:
    """What `host.predict` takes: the cross-attention context and, for SDXL, the pooled text [b, P] and the
    six size numbers per image [b, 6]. `vector(dim)` is sgm's label_emb input; diffusers' UNet takes the two
    parts (text_embeds, time_ids) and embeds the numbers itself, the same way."""
    crossattn: torch.Tensor
    pooled: torch.Tensor | None = None
    sizes: torch.Tensor | None = None

    def to(self, device, dtype) -> "Cond":
        move = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
        return Cond(move(self.crossattn), move(self.pooled), None if self.sizes is None else self.sizes.to(device))

    def vector(self, size_dim: int) -> torch.Tensor | None:
        if self.pooled is None:
            return None
        flat = sinusoidal(self.sizes.flatten(), size_dim).reshape(len(self.sizes), -1)
        return torch.cat([self.pooled, flat.to(self.pooled.dtype)], dim=1)

    @staticmethod
    def cat(parts: list) -> "Cond":
        both = lambda name: None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        return Cond(both("crossattn"), both("pooled"), both("sizes"))


def sinusoidal(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[n] numbers -> [n, dim] embeddings: cos(v * f) then sin(v * f), f = max_period^(-i / (dim / 2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


def condition(text: Text, sizes: list | None) -> Cond:
    """The UNet's conditioning from text outputs and (SDXL) the per-image sizes."""
    if text.pooled is None:
        return Cond(text.tokens)
    if sizes is None or len(sizes) != len(text.tokens):
        raise ValueError("SDXL conditioning needs one Size per prompt")
    numbers = torch.tensor([s.numbers() for s in sizes], dtype=torch.float32, device=text.pooled.device)
    return Cond(text.tokens, text.pooled, numbers)
