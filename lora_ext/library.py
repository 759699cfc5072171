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


def list_files(folder: str, extensions: tuple, exclude: tuple = ()) -> list[str]:
    """Files under `folder` ending in one of `extensions` but none of `exclude` (hidden ones left out), as
    paths relative to it with '/' separators, sorted case-insensitively: what the dropdowns show."""
    found = []
    if not os.path.isdir(folder):
        return found
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in names:
            low = n.lower()
            # regular files only: reading a FIFO or a device named *.safetensors would block forever
            if low.endswith(extensions) and not low.endswith(exclude) and not n.startswith(".") \
                    and os.path.isfile(os.path.join(root, n)):
                found.append(os.path.relpath(os.path.join(root, n), folder).replace(os.sep, "/"))
    return sorted(found, key=str.lower)


def list_loras(folder: str) -> list[str]:
    return list_files(folder, LORA_EXT)


def list_checkpoints(folder: str) -> list[str]:
    """Checkpoints as the webui lists them: .safetensors and .ckpt files, VAEs (.vae.*) left out."""
    return list_files(folder, (".safetensors", ".ckpt"), (".vae.safetensors", ".vae.ckpt"))


class LoraLibrary:
    """The LoRA files of one or more folders (the webui's models/Lora first, then extra folders), by the names
    the dropdowns show: paths relative to their folder, '/'-separated. A name in two folders is the first's.

    `hash_fn(path, name)`, if given, returns a file's addnet hash from the host's own cache (the webui keeps
    one), so files are not hashed again; without it, hashes are computed once per file version."""

    def __init__(self, folders_fn, hash_fn=None):
        self.folders_fn = folders_fn
        self.hash_fn = hash_fn
        self._hashes: dict = {}

    def _index(self) -> dict:
        index = {}
        for folder in self.folders_fn():
            for name in list_loras(folder):
                index.setdefault(name, folder)
        return index

    def names(self) -> list[str]:
        return sorted(self._index(), key=str.lower)

    def path(self, name: str) -> str:
        folder = self._index().get(name)
        if folder is None:
            raise FileNotFoundError(f"{name} is not in the LoRA folders")
        return resolve(folder, name)

    def short_hash(self, name: str) -> str | None:
        """The first 12 hex of the file's addnet hash (what the webui shows and infotext records)."""
        try:
            return self._short_hash(self.path(name), name)
        except (FileNotFoundError, UnsafeName):
            return None

    def _short_hash(self, path: str, name: str) -> str | None:
        st = os.stat(path)
        key = (path, st.st_mtime_ns, st.st_size)
        if key not in self._hashes:
            self._hashes[key] = self._hash(path, name)
        h = self._hashes[key]
        return h[:12] if h else None

    def _hash(self, path: str, name: str) -> str | None:
        from .safetensors_io import FileProblem, file_hashes, read_header

        if not os.path.isfile(path):
            return None
        if path.endswith(SAFETENSORS_EXT):
            try:
                with open(path, "rb") as f:
                    _, metadata, _ = read_header(f, os.path.getsize(path))
                if metadata.get("sshs_model_hash"):
                    return metadata["sshs_model_hash"]
            except FileProblem:
                return None
        if self.hash_fn is not None:
            h = self.hash_fn(path, name)
            if h:
                return h
        hashes = file_hashes(path)
        return hashes["addnet_hash"] if path.endswith(SAFETENSORS_EXT) else hashes["sha256"]

    def find(self, label: str, short_hash: str | None = None) -> str | None:
        """The name for an infotext label (a path without extension, or a bare file name) and hash: the name
        first, then a file of another name with that hash."""
        index = self._index()               # one walk of the folders for the whole search
        names = sorted(index, key=str.lower)

        def hash_matches(n):
            return (self._short_hash(resolve(index[n], n), n) or "").startswith(short_hash.lower())

        for n in names:
            if n == label or display_name(n) == label:
                if not short_hash or hash_matches(n):
                    return n
        base = label.rsplit("/", 1)[-1]
        same_base = [n for n in names if display_name(n).rsplit("/", 1)[-1] == base]
        if short_hash:
            return next((n for n in same_base + [n for n in names if n not in same_base] if hash_matches(n)), None)
        return same_base[0] if same_base else None


def display_name(model: str) -> str:
    """The name infotext labels a models-list name with: the path without its extension (as the old
    additional-networks extension wrote it)."""
    return model.rsplit(".", 1)[0] if "." in model.rsplit("/", 1)[-1] else model
