"""Registries of classes named "module:Class" (the host adapters, the training features): a new entry is one
line where the list is, and nothing is imported until it is asked for."""
from __future__ import annotations

import importlib


def classes(specs) -> list:
    """The classes `specs` ("package.module:Class" each) name, in order."""
    out = []
    for spec in specs:
        module, _, name = spec.partition(":")
        out.append(getattr(importlib.import_module(module), name))
    return out
