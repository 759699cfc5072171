"""LoRAs baked into a checkpoint, streaming: the base is read and the result written one tensor at a time,
so the memory needed is about one tensor plus the LoRAs, not the whole model. Reads safetensors, or .ckpt
with weights_only=True; writes safetensors (or .ckpt on request) to a temporary name, then renames it; never
over an existing file unless asked. The base's metadata is kept, with a record of what was merged."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch

from . import files, naming
from .atomic import SameFile, atomic_write, refuse_inputs_as_output
from .pickles import load_pickle_safely
from .safetensors_io import TORCH_DTYPES, FileProblem, file_hashes, read_header, write_streaming
from .weights import weight_value

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_CODES = {v: k for k, v in TORCH_DTYPES.items()}


class MergeError(ValueError):
    pass


@dataclass(frozen=True)
class Item:
    path: str
    unet: float = 1.0
    te: float = 1.0


class CheckpointReader:
    """The base checkpoint, tensor by tensor, in file order."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise MergeError(f"{path}: no such checkpoint")
        self.path = path
        if path.endswith(".safetensors"):
            try:
                with open(path, "rb") as f:
                    self.header, self.metadata, self.data_start = read_header(f, os.path.getsize(path))
            except FileProblem as e:
                raise MergeError(f"{path}: {e}") from None
            order = sorted(self.header, key=lambda k: self.header[k]["data_offsets"][0])
            self.entries = [(k, self.header[k]["dtype"], tuple(self.header[k]["shape"])) for k in order]
            self.get = self._read
        else:
            try:
                sd = load_pickle_safely(path, mmap=True)
            except FileProblem as e:
                raise MergeError(f"{path}: cannot be read safely: {e}") from None
            sd = sd.get("state_dict", sd)
            sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
            self.metadata = {}
            self.entries = [(k, _CODES[str(v.dtype).removeprefix("torch.")], tuple(v.shape)) for k, v in sd.items()]
            self.get = sd.__getitem__

    def _read(self, name: str) -> torch.Tensor:
        # a plain read of one tensor's bytes: a memory map would keep every page it touched resident
        entry = self.header[name]
        begin, end = entry["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            raw = bytearray(f.read(end - begin))
        dtype = getattr(torch, TORCH_DTYPES[entry["dtype"]])
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(entry["shape"]) if raw else \
            torch.empty(entry["shape"], dtype=dtype)

    @property
    def shapes(self) -> dict:
        return {k: shape for k, _, shape in self.entries}


def merge_checkpoint(base_path: str, items: list, out_path: str, precision: str | None = "fp16",
                     overwrite: bool = False, on_progress=None) -> dict:
    """`on_progress(done, total)`: told after each tensor written."""
    started = time.perf_counter()
    base_yaml, out_yaml = _checked(base_path, items, out_path, precision, overwrite)
    base = CheckpointReader(base_path)
    try:
        arch = naming.arch_from_state_dict(base.shapes)
    except (KeyError, StopIteration, IndexError):
        raise MergeError(f"{base_path}: not a Stable Diffusion checkpoint in the webui's layout") from None
    plan, record = _plan(base, arch, items)
    target_dtype = PRECISIONS.get(precision)
    done = [0]

    def produce(name):
        done[0] += 1
        if on_progress is not None:
            on_progress(done[0], len(base.entries))
        return _merged(name, base.get(name), plan.get(name, ()), target_dtype, precision)

    entries = [(k, _CODES[str(target_dtype).removeprefix("torch.")] if target_dtype is not None and
                TORCH_DTYPES[code].startswith(("float", "bfloat")) else code, shape) for k, code, shape in base.entries]
    metadata = {**base.metadata, "lora_ext_merged": json.dumps(record), "lora_ext_precision": precision or "kept"}
    if out_path.endswith(".safetensors"):
        write_streaming(out_path, entries, produce, metadata, overwrite)
    else:
        import io
        buf = io.BytesIO()
        torch.save({"state_dict": {k: produce(k) for k, _, _ in entries}}, buf)
        atomic_write(out_path, buf.getvalue(), overwrite)
    if base_yaml:
        with open(base_yaml, "rb") as f:
            atomic_write(out_yaml, f.read(), overwrite)
    return {"out": out_path, "yaml": out_yaml if base_yaml else None, "arch": arch.name, "tensors": len(entries),
            "merged_tensors": len(plan), "loras": record, "seconds": time.perf_counter() - started,
            **file_hashes(out_path)}


def _checked(base_path: str, items: list, out_path: str, precision, overwrite: bool) -> tuple:
    """MergeError for what is wrong with the request before anything is read; else (the base's .yaml or None,
    where the merged checkpoint's goes). A base of other shapes than the standard ones has its config beside it
    (the webui's convention): the merged checkpoint gets a copy, or the webui would load it with the wrong
    config."""
    if precision is not None and precision not in PRECISIONS:
        raise MergeError(f"precision {precision!r}: fp16, bf16 or fp32")
    if not out_path.endswith((".safetensors", ".ckpt")):
        raise MergeError(f"{out_path}: the merged checkpoint ends in .safetensors (or .ckpt)")
    if os.path.exists(out_path) and not overwrite:
        raise MergeError(f"{out_path} exists; choose another name or allow overwriting")
    try:
        refuse_inputs_as_output(out_path, [base_path] + [item.path for item in items])
    except SameFile as e:
        raise MergeError(str(e)) from None
    try:
        for item in items:
            for ratio in (item.unet, item.te):
                weight_value(ratio, f"{item.path}: the ratio")
    except ValueError as e:
        raise MergeError(str(e)) from None
    base_yaml, out_yaml = (os.path.splitext(p)[0] + ".yaml" for p in (base_path, out_path))
    base_yaml = base_yaml if os.path.isfile(base_yaml) else None
    if base_yaml and os.path.exists(out_yaml) and not overwrite:
        raise MergeError(f"{out_yaml} exists (the merged checkpoint's config would go there); choose another "
                         "name or allow overwriting")
    return base_yaml, out_yaml


def _merged(name: str, t, changes, target_dtype, precision):
    """The base's tensor `t` with its LoRAs' changes added (`changes`: (module, ratio, rows, part) each), in
    the output's dtype."""
    out_dtype = target_dtype if target_dtype is not None and t.is_floating_point() else t.dtype
    if changes:
        acc = t.to(torch.float32, copy=True)
        for module, ratio, rows, part in changes:
            view = acc[rows] if rows is not None else acc
            # DoRA, IA3, OFT and GLoRA compute with the weight before any network
            view.add_(module.change(part, view.shape, t[rows] if rows is not None else t), alpha=ratio)
        t = acc.to(out_dtype)      # the header's dtype, also when the base's precision is kept
        if not bool(torch.isfinite(t).all()):
            raise MergeError(f"{name}: the merged weights hold NaN or infinity (a ratio too large for "
                             f"{precision or 'the base precision'}, or a damaged LoRA); nothing was written")
    return t.to(out_dtype).contiguous()


def _plan(base, arch, items):
    """{checkpoint key: [(StoredModule, ratio, rows, part)]} (part: weight or bias) and the record of what is merged."""
    plan, record = {}, []
    shapes = base.shapes
    for item in items:
        try:
            lora = files.read(item.path, arch)
        except files.LoraFileError as e:
            raise MergeError(str(e)) from None
        used = 0
        for name, module in lora.modules.items():
            t = lora.targets[name]
            ratio = item.unet if t.is_unet else item.te
            key = t.checkpoint_key
            if key not in shapes:
                raise MergeError(f"{item.path}: layer {name} is not in the checkpoint ({key})")
            shape = shapes[key]
            rows = None
            if t.qkv is not None:
                n = shape[0] // 3
                rows, shape = slice(t.qkv * n, (t.qkv + 1) * n), (n,) + tuple(shape[1:])
            if not module.fits(shape):
                raise MergeError(f"{item.path}: layer {name} does not fit the checkpoint's "
                                 f"{'x'.join(map(str, shape))} weight: it was made for another model")
            bias_key = t.checkpoint_bias_key if module.changes_bias else None
            if bias_key is not None:
                bias_shape = shapes.get(bias_key)
                if rows is not None and bias_shape is not None:
                    bias_shape = (bias_shape[0] // 3,)
                if not module.fits_bias(bias_shape):
                    raise MergeError(f"{item.path}: layer {name} changes a bias the checkpoint's layer "
                                     f"{'does not have' if bias_shape is None else 'has another size of'}: it was "
                                     "made for another model")
            if ratio:
                plan.setdefault(key, []).append((module, float(ratio), rows, "weight"))
                if bias_key is not None:
                    plan.setdefault(bias_key, []).append((module, float(ratio), rows, "bias"))
                used += 1
        record.append({"file": os.path.basename(item.path), "unet": item.unet, "te": item.te, "modules": used,
                       "sshs_model_hash": lora.metadata.get("sshs_model_hash")})
    return plan, record
