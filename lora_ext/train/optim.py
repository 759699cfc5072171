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
    key = name.lower()
    if key in ("adamw8bit", "adamw_8bit"):
        if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes"):
            import bitsandbytes as bnb
            return bnb.optim.AdamW8bit(groups, **kw)
        messages.append("AdamW8bit needs CUDA and bitsandbytes; using AdamW (32-bit) instead")
        key = "adamw"
    if key == "adamw":
        return torch.optim.AdamW(groups, **kw)
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


def autocast_dtype(mixed_precision: str, device: torch.device, messages: list):
    """The autocast dtype for the run, or None for fp32."""
    want = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    dtype = want.get(mixed_precision)
    if dtype is None:
        return None
    if device.type != "cuda":
        messages.append(f"mixed precision {mixed_precision} needs a CUDA GPU; training in fp32 on the {device.type}")
        return None
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        messages.append("this GPU has no bf16; using fp16")
        return torch.float16
    return dtype


def save_dtype(save_precision: str):
    return {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16}.get(save_precision, torch.float32)
