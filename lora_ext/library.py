"""The LoRA files a user has: listing the models folders, and turning a name from the UI into a path that
never leaves its folder."""
from __future__ import annotations

import os

SAFETENSORS_EXT = (".safetensors",)
PICKLE_EXT = (".pt", ".ckpt", ".pth", ".bin")
LORA_EXT = SAFETENSORS_EXT + PICKLE_EXT


class UnsafeName(ValueError):
    pass


def resolve(folder: str, name: str) -> str:
    """The path of `name` (a path relative to `folder`, as the dropdowns show it) inside `folder`.
    Absolute paths, '..' and links that point outside the folder are refused."""
    if not name or os.path.isabs(name) or "\x00" in name:
        raise UnsafeName(f"{name!r} is not a name inside the models folder")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise UnsafeName(f"{name!r} points outside the models folder {folder}")
    return path


def list_loras(folder: str) -> list[str]:
    """LoRA files under `folder`, as paths relative to it with '/' separators, sorted case-insensitively."""
    found = []
    if not os.path.isdir(folder):
        return found
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in names:
            if n.lower().endswith(LORA_EXT) and not n.startswith("."):
                found.append(os.path.relpath(os.path.join(root, n), folder).replace(os.sep, "/"))
    return sorted(found, key=str.lower)
