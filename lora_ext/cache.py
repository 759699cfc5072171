"""Loaded LoRA files, kept while unchanged on disk, bounded in bytes (least recently used goes first)."""
from __future__ import annotations

import os
from collections import OrderedDict

from . import files


def _nbytes(lora: files.LoraFile) -> int:
    return sum(t.numel() * t.element_size() for m in lora.modules.values() for t in m.parts.values())


class LoraCache:
    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._items: OrderedDict = OrderedDict()     # (path, arch) -> (stamp, LoraFile, nbytes)
        self.reads = 0                               # files read from disk, for tests and benchmarks

    @staticmethod
    def stamp(path: str) -> tuple:
        st = os.stat(path)
        return st.st_mtime_ns, st.st_size

    def get(self, path: str, arch) -> tuple[files.LoraFile, tuple]:
        """(LoraFile, stamp). Reads the file only when it is not cached or changed on disk since."""
        path = os.path.realpath(path)
        try:
            stamp = self.stamp(path)
        except OSError:
            raise files.LoraFileError(path, "no such file") from None
        key = (path, arch)
        hit = self._items.get(key)
        if hit is not None and hit[0] == stamp:
            self._items.move_to_end(key)
            return hit[1], stamp
        lora = files.read(path, arch)
        self.reads += 1
        self._items[key] = (stamp, lora, _nbytes(lora))
        self._items.move_to_end(key)
        self._evict()
        return lora, stamp

    def _evict(self) -> None:
        total = sum(n for _, _, n in self._items.values())
        while total > self.max_bytes and len(self._items) > 1:
            _, (_, _, n) = self._items.popitem(last=False)
            total -= n
