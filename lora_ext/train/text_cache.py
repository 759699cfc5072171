"""kohya's --cache_text_encoder_outputs: each caption encoded once (the encoders are frozen and captions do
not change between steps, which the config checks), in memory and optionally on disk. A disk entry is
named by a digest of what the encoding depends on: the caption, clip skip, token length and a fingerprint
of the text encoders' weights, so another model or option never reads a stale entry."""
from __future__ import annotations

import hashlib
import os

import torch

from ..hosts.conditioning import Text


def fingerprint(modules) -> str:
    """A digest of a slice of each module's first and last weight (cheap, different for every trained
    model): what a cache of their outputs is keyed by."""
    h = hashlib.sha256()
    for module in modules:
        params = list(module.parameters())
        for weight in dict.fromkeys((params[0], params[-1])) if params else ():
            weight = weight.detach()
            h.update(repr((tuple(weight.shape), str(weight.dtype))).encode())
            if weight.device.type != "meta":
                h.update(weight.flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class TextCache:
    def __init__(self, encode, settings: str, folder: str | None = None):
        self.encode = encode                # captions -> Text
        self.settings = settings            # what the encoding depends on besides the caption
        self.folder = folder                # None: memory only
        self.memory: dict = {}
        self.encoded = 0

    def get(self, captions: list) -> Text:
        missing = [c for c in dict.fromkeys(captions) if c not in self.memory]
        for caption in missing:
            self.memory[caption] = self._load(caption) or self._encode(caption)
        return Text.cat([self.memory[c] for c in captions])

    def _encode(self, caption: str) -> Text:
        with torch.no_grad():
            text = self.encode([caption])
        text = Text(text.tokens.detach().cpu(), None if text.pooled is None else text.pooled.detach().cpu())
        self.encoded += 1
        if self.folder:
            self._save(caption, text)
        return text

    def _file(self, caption: str) -> str:
        digest = hashlib.sha256(f"{self.settings}\0{caption}".encode()).hexdigest()[:32]
        return os.path.join(self.folder, f"{digest}.lora_ext-text")

    def _load(self, caption: str) -> Text | None:
        if not self.folder:
            return None
        from safetensors import safe_open      # never torch.load: see batches.LatentCache

        path = self._file(caption)
        if not os.path.exists(path):
            return None
        try:
            with safe_open(path, framework="pt") as f:
                if (f.metadata() or {}).get("caption") != caption:
                    return None
                pooled = f.get_tensor("pooled") if "pooled" in f.keys() else None
                return Text(f.get_tensor("tokens"), pooled)
        except Exception:           # a damaged entry is encoded again
            return None

    def _save(self, caption: str, text: Text) -> None:
        from safetensors.torch import save

        from ..atomic import atomic_write

        tensors = {"tokens": text.tokens.contiguous()}
        if text.pooled is not None:
            tensors["pooled"] = text.pooled.contiguous()
        os.makedirs(self.folder, exist_ok=True)
        atomic_write(self._file(caption), save(tensors, {"caption": caption}), overwrite=True)
