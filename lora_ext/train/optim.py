"""Optimizers by kohya's names, and what precision a run can use on this machine. Where a choice needs what
the machine lacks (8-bit Adam without CUDA or bitsandbytes, fp16/bf16 on the CPU), the run falls back and
says so in a message, never silently."""
from __future__ import annotations

import importlib.util

import torch


def _kwargs(args: list) -> dict:
    """kohya's optimizer_args ("weight_decay=0.01", "betas=0.9,0.99"): Python literals, else strings."""
    import ast

    out = {}
    for a in args:
        k, _, v = str(a).partition("=")
        try:
            out[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            out[k.strip()] = v.strip()
    return out


def make_optimizer(name: str, groups: list, args: list, messages: list):
    kw = _kwargs(args)
    key = name.lower() or "adamw"       # kohya's default, "", is AdamW
    if key in ("adamw8bit", "adamw_8bit"):
        if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes"):
            import bitsandbytes as bnb
            return bnb.optim.AdamW8bit(groups, **kw)
        messages.append("AdamW8bit needs CUDA and bitsandbytes; using AdamW (32-bit) instead")
        key = "adamw"
    if key == "adamw":
        return _adamw(groups, kw)
    if key == "sgd":
        return torch.optim.SGD(groups, **kw)
    if key == "lion":
        if not importlib.util.find_spec("lion_pytorch"):
            raise ValueError("optimizer Lion needs the package lion-pytorch (pip install lion-pytorch)")
        from lion_pytorch import Lion
        return Lion(groups, **kw)
    if key == "prodigy":
        if not importlib.util.find_spec("prodigyopt"):
            raise ValueError("optimizer Prodigy needs the package prodigyopt (pip install prodigyopt)")
        from prodigyopt import Prodigy
        return Prodigy(groups, **kw)
    raise ValueError(f"unknown optimizer_type {name!r}: AdamW, AdamW8bit, Lion, Prodigy or SGD")


def problems(name: str, args: list) -> list:
    """What is wrong with the optimizer a run asks for, found before any model loads: its name, its package,
    its arguments (it is built once, with them, on a one-number parameter)."""
    bad = [a for a in args if "=" not in str(a)]
    if bad:
        return [f"optimizer_args {bad[0]!r} is not key=value"]
    try:
        make_optimizer(name, [{"params": [torch.zeros(1, requires_grad=True)], "lr": 1e-3}], args, [])
    except ValueError as e:
        return [str(e)]
    except TypeError as e:          # an argument the optimizer does not take
        return [f"optimizer_args for {name}: {e}"]
    return []


def _adamw(groups: list, kw: dict):
    """torch's AdamW, its update fused into one kernel where this torch has one for the parameters' device
    (CPU since torch 2.4, CUDA): on the reference job's 528 LoRA tensors a step took 8 ms fused, 21 ms in
    the default per-tensor loop, 26 ms foreach (2-core CPU). optimizer_args naming foreach or fused decide."""
    if "fused" in kw or "foreach" in kw:
        return torch.optim.AdamW(groups, **kw)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except RuntimeError:        # an older torch, or a device without the kernel
        return torch.optim.AdamW(groups, **kw)


def cpu_bf16() -> str | None:
    """The CPU's bf16 matrix instructions ('AMX-BF16', 'AVX512-BF16'), or None: without them bf16 on the CPU
    is emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None


_HALF = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def autocast_dtype(mixed_precision: str, device: torch.device, messages: list, cpu_has=None):
    """The autocast dtype for the run, or None for fp32. On the CPU: bf16 where it has bf16 instructions
    (the LoRA's parameters, gradients and optimizer stay fp32, as in mixed precision on a GPU); fp16 never (the
    CPU's fp16 paths are slower than fp32)."""
    dtype = _HALF.get(mixed_precision)
    if dtype is None:
        return None
    if device.type == "cpu" and dtype == torch.bfloat16:
        found = (cpu_has or cpu_bf16)()
        if found:
            messages.append(f"mixed precision bf16 on the CPU: it has {found} (the frozen weights held in bf16 "
                            "for the run, the LoRA kept in fp32)")
            return torch.bfloat16
        messages.append("mixed precision bf16 needs a CUDA GPU or a CPU with AMX / AVX512-BF16 (this one has "
                        "neither); training in fp32")
        return None
    if device.type != "cuda":
        messages.append(f"mixed precision {mixed_precision} needs a CUDA GPU (or bf16 on a CPU with AMX / "
                        f"AVX512-BF16); training in fp32 on the {device.type}")
        return None
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        messages.append("this GPU has no bf16; using fp16")
        return torch.float16
    return dtype


def frozen_storage(mixed_precision: str, device: torch.device, frozen_weights: str = "fp32", cpu_has=None):
    """How a headless run loads its frozen UNet / text-encoder Linear and Conv2d weights: a function of the
    dtype the file stores each in, giving the dtype to hold it in (None: fp32), or None when all are fp32.
    Under autocast its dtype. On a CPU computing in fp32 (train.upcast casts each layer's weight up at use):
    the asked-for half dtype; with no half dtype asked for and `frozen_weights` "as_stored", the file's own
    half dtype, where it has one: the same values, in half the memory (kohya holds fp32 copies)."""
    amp = autocast_dtype(mixed_precision, device, [], cpu_has)
    if amp is not None:
        return lambda stored: amp
    if device.type != "cpu":
        return None
    half = _HALF.get(mixed_precision)
    if half is not None:
        return lambda stored: half
    if frozen_weights == "as_stored":
        return lambda stored: stored if stored in (torch.float16, torch.bfloat16) else None
    return None


def save_dtype(save_precision: str):
    return _HALF.get(save_precision, torch.float32)
