"""The safetensors container: a header check that names what is wrong, reading, hashes, and writing one tensor
at a time (through atomic.atomic_write).

The safetensors library validates files too, but its messages ("MetadataIncompleteBuffer") do not tell a
user what to fix, and we want every malformed file to fail the same clear way before any tensor is read.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Mapping

from .atomic import atomic_write

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
MAX_HEADER = 100 * 1024 * 1024


class FileProblem(ValueError):
    """A file that cannot be read as it is; the message says what is wrong with it."""


def read_header(f, size: int) -> tuple[dict, dict, int]:
    """Parses and checks the header of an open safetensors file of `size` bytes.
    Returns (tensor entries, metadata, offset of the data section)."""
    if size < 8:
        raise FileProblem(f"the file is {size} bytes long, too short to be safetensors (truncated or empty)")
    n = int.from_bytes(f.read(8), "little")
    if n > size - 8:
        raise FileProblem(f"the header claims {n} bytes but the file has only {size - 8} after the length "
                          "field (truncated, or not a safetensors file)")
    if n > MAX_HEADER:
        raise FileProblem(f"the header claims {n} bytes, more than any LoRA needs; not a safetensors file")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileProblem(f"the header is not valid JSON ({e}); not a safetensors file, or damaged") from None
    except RecursionError:
        raise FileProblem("the header nests JSON deeper than any safetensors file does; not a safetensors "
                          "file, or made to break readers") from None
    if not isinstance(header, dict):
        raise FileProblem("the header is not a JSON object; not a safetensors file")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FileProblem("the __metadata__ block must map names to strings")
    data_len = size - 8 - n
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise FileProblem(f"tensor {name!r}: header entry lacks dtype/shape/data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise FileProblem(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise FileProblem(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise FileProblem(f"tensor {name!r}: data_offsets {offsets!r} is not a pair of integers")
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * DTYPE_SIZES[dtype]:
            raise FileProblem(f"tensor {name!r}: {dtype} {shape} needs {numel * DTYPE_SIZES[dtype]} bytes but its "
                              f"offsets span {end - begin}")
        if begin < 0 or end > data_len:
            raise FileProblem(f"tensor {name!r}: its bytes [{begin}, {end}) lie outside the data section "
                              f"({data_len} bytes); the file is truncated or its header is wrong")
        spans.append((begin, end, name))
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise FileProblem(f"tensors {n0!r} and {n1!r} overlap in the file; its header is wrong")
    return header, metadata, 8 + n


def load(path: str) -> tuple[dict, dict]:
    """Reads a safetensors file after checking its header. Returns (tensors, metadata)."""
    from safetensors.torch import load as st_load

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        read_header(f, size)
        f.seek(0)
        data = f.read()
    try:
        tensors = st_load(data)
    except Exception as e:  # the library's own checks, beyond ours
        raise FileProblem(f"safetensors could not read it: {e}") from None
    _, metadata, _ = read_header(io.BytesIO(data), size)
    return tensors, metadata


def file_hashes(path: str) -> dict:
    """sha256 of the whole file, and for safetensors the 'addnet' hash the webui shows: sha256 of the bytes
    after the header (None for other files)."""
    whole, body = hashlib.sha256(), hashlib.sha256()
    is_st = path.endswith(".safetensors")
    with open(path, "rb") as f:
        head = f.read(8) if is_st else b""
        whole.update(head)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if n > os.path.getsize(path):
            is_st, n = False, 0
        header = f.read(n)
        whole.update(header)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            whole.update(chunk)
            body.update(chunk)
    return {"sha256": whole.hexdigest(), "addnet_hash": body.hexdigest() if is_st else None}


def legacy_model_hash(path: str) -> str:
    """The short model hash older tools show (the webui's "old hash", kohya's ss_sd_model_hash): sha256 of
    64 KiB at offset 1 MiB, 8 hex."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def addnet_hashes(data: bytes) -> tuple[str, str]:
    """(addnet hash, legacy addnet hash) of serialized safetensors bytes, as kohya pre-computes them into
    sshs_model_hash / sshs_legacy_hash: sha256 after the header, and sha256 of 64 KiB at offset 1 MiB (8 hex)."""
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class Stored:
    """A tensor's entry in a file: its shape and dtype, without its data."""

    def __init__(self, shape, dtype):
        import torch

        self.shape, self.dtype = torch.Size(shape), dtype


class Reader(Mapping):
    """The tensors of a safetensors file by name (values: `Stored`, shape and dtype only), each read when
    asked into a tensor the caller placed (`read_into`): plain reads, no mapping of the file, so a
    checkpoint's pages never count as the process's memory, and no second copy of the whole file."""

    def __init__(self, path: str):
        self.path = path
        self.f = open(path, "rb")
        try:
            self.entries, self.metadata, self.start = read_header(self.f, os.path.getsize(path))
        except BaseException:
            self.f.close()
            raise

    def __getitem__(self, name):
        import torch

        e = self.entries[name]
        if e["dtype"] not in TORCH_DTYPES:
            raise FileProblem(f"tensor {name!r}: dtype {e['dtype']} is not one torch reads")
        return Stored(e["shape"], getattr(torch, TORCH_DTYPES[e["dtype"]]))

    def __contains__(self, name) -> bool:
        return name in self.entries

    def __iter__(self):
        return iter(self.entries)

    def __len__(self):
        return len(self.entries)

    def read_into(self, name: str, dest) -> None:
        """The tensor's values into `dest` (its shape; converted to its dtype and device)."""
        import torch

        stored, (begin, end) = self[name], self.entries[name]["data_offsets"]
        direct = dest.dtype == stored.dtype and dest.device.type == "cpu" and dest.is_contiguous()
        target = dest if direct else torch.empty(stored.shape, dtype=stored.dtype)
        self.f.seek(self.start + begin)
        if self.f.readinto(target.reshape(-1).view(torch.uint8).numpy()) != end - begin:
            raise FileProblem(f"tensor {name!r}: the file ended inside its data (truncated while read?)")
        if not direct:
            dest.copy_(target)

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def write_streaming(path: str, entries: list, produce, metadata: dict, overwrite: bool = False) -> None:
    """A safetensors file written one tensor at a time: `entries` is [(name, dtype code, shape)] in file
    order, `produce(name)` returns that tensor (contiguous, on the CPU) when its turn comes. Only one
    tensor is held at a time; the header is known up front from the shapes."""
    import torch

    header, offset = {}, 0
    for name, code, shape in entries:
        n = DTYPE_SIZES[code]
        for d in shape:
            n *= d
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header = {"__metadata__": metadata, **header}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)       # the data section starts 8-byte aligned, as safetensors writes it

    def write(f):
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, code, shape in entries:
            t = produce(name)
            if str(t.dtype).removeprefix("torch.") != TORCH_DTYPES[code] or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: produced {t.dtype} {tuple(t.shape)}, the header says {code} {tuple(shape)}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)     # no copy

    atomic_write(path, write, overwrite=overwrite)
