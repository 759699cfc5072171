"""The network types a file can hold, one class per type, in one list (the way LyCORIS's MODULE_LIST and the
webui's `module_types` do it). Each type owns its file parts (and so its detection), its shape checks, its
rank, its weight delta and whether it is a plain low-rank pair (what resize, merge-LoRAs and the fast merge
path take). A new type is one new file here plus its line in TYPES."""
from __future__ import annotations

from .base import BadModule, NetworkType
from .full import Full
from .glora import GLoRA
from .ia3 import IA3
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA
from .norm import Norm
from .oft import OFT

TYPES: tuple[NetworkType, ...] = (LoRA(), LoHa(), LoKr(), IA3(), OFT(), GLoRA(), Full(), Norm())
BY_NAME = {t.name: t for t in TYPES}
# every part a kohya-style file may hold for a module of a type we read (DoRA's magnitude rides on any)
KNOWN_PARTS = frozenset(p for t in TYPES for p in t.parts) | {"alpha", "dora_scale"}


def trained() -> list:
    """The types lora_ext trains, in TYPES' order."""
    return [t for t in TYPES if t.trainable() is not None]


def training_algos() -> dict:
    """{LyCORIS algo: the type that trains it} (lora and locon both LoRA: locon is LoRA with convolutions)."""
    return {algo: t for t in trained() for algo in t.algos}


def detect(parts: dict) -> NetworkType:
    for t in TYPES:
        if t.detect(parts):
            return t
    names = ", ".join(t.title for t in TYPES)
    raise BadModule(f"its tensors ({', '.join(sorted(parts)) or 'none'}) form no {names} module")


__all__ = ["TYPES", "BY_NAME", "KNOWN_PARTS", "BadModule", "NetworkType", "detect", "trained", "training_algos"]
