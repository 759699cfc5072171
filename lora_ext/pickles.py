"""PyTorch pickle files (.pt, .ckpt) read without running any code from them: tensors and plain containers
only, whatever `torch.load` is inside the host."""
from __future__ import annotations

import os
import re

from .safetensors_io import FileProblem


def load_pickle_safely(path: str, mmap: bool = False):
    """A .pt/.ckpt file's contents with torch.load(weights_only=True): tensors and plain containers only, so
    no code from a user's file ever runs. Anything else raises FileProblem saying what to do."""
    import pickle

    import torch

    # torch.serialization.load, not torch.load: the webui replaces torch.load with its own checker, which
    # refuses files this torch writes and returns None in place of their contents
    load = torch.serialization.load
    if os.path.getsize(path) == 0:
        raise FileProblem("the file is empty (0 bytes)")
    try:
        try:
            return load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not (mmap and "mmap can only be used" in str(e)):
                raise
            return load(path, map_location="cpu", weights_only=True)       # an old, non-zip file: no mmap
    except pickle.UnpicklingError as e:
        # torch's own text goes on to explain how to load the file anyway: we name what it holds, no more
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise FileProblem(f"it holds pickled objects other than tensors{what}, which are never loaded (they "
                          "could run code); convert it to safetensors with the tool that made it") from None
    except Exception as e:
        raise FileProblem(f"it is not a readable PyTorch file ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    lines = [line for line in _ANSI.sub("", str(e)).splitlines() if line.strip()]
    return lines[0][:200] if lines else "no details"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
