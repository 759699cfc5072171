"""Host adapters: one file each over a kind of loaded model, all held to one contract (protocol.Host), and
the one factory that picks among them. Training, applying, merging and the tools take whatever `for_model`
gives; none of them builds an adapter or asks which one it has.

A new host is its file here and its line in ADAPTERS (tests/test_hosts.py checks every registered adapter
against the Protocol). The adapters are imported when first asked for: the webui's start-up pays nothing."""
from __future__ import annotations

from ..registry import classes

# "module:Class", most specific first; each class answers `accepts(model)`
ADAPTERS = ("lora_ext.hosts.webui:WebuiHost", "lora_ext.hosts.forge:ForgeHost")


class UnsupportedModel(ValueError):
    """A loaded model no adapter takes; the message names it."""


def adapters() -> list:
    """The registered adapter classes, in order."""
    return classes(ADAPTERS)


def for_model(model):
    """The host adapter over `model` (the webui's loaded model, a headless checkpoint, a tiny test model)."""
    for cls in adapters():
        if cls.accepts(model):
            return cls(model)
    raise UnsupportedModel(f"the loaded model ({type(model).__module__}.{type(model).__name__}) is of no kind "
                           f"lora_ext works on (it takes: {', '.join(c.__name__ for c in adapters())})")
