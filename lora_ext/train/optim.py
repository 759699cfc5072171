"""Optimizers by kohya's names, and what precision a run can use on this machine. Where a choice needs what
the machine lacks (8-bit Adam without CUDA or bitsandbytes, fp16/bf16 on the CPU), the run falls back and
says so in a message, never silently."""
from __future__ import annotations

import importlib.util

import torch

from .kohya_options import OPTIMIZER_NAMES


def kwargs_of(args: list) -> dict:
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


# kohya's optimizer_type names (train_util.get_optimizer), lower-cased -> (package, class path, the 32-bit
# optimizer a machine without CUDA or bitsandbytes gets instead, or None)
_BNB = "bitsandbytes"
OPTIMIZERS = {
    "adamw": (None, "torch.optim.AdamW", None),
    "adamw8bit": (_BNB, "bitsandbytes.optim.AdamW8bit", "adamw"),
    "pagedadamw": (_BNB, "bitsandbytes.optim.PagedAdamW", "adamw"),
    "pagedadamw8bit": (_BNB, "bitsandbytes.optim.PagedAdamW8bit", "adamw"),
    "pagedadamw32bit": (_BNB, "bitsandbytes.optim.PagedAdamW32bit", "adamw"),
    "lion": ("lion_pytorch", "lion_pytorch.Lion", None),
    "lion8bit": (_BNB, "bitsandbytes.optim.Lion8bit", "lion"),
    "pagedlion8bit": (_BNB, "bitsandbytes.optim.PagedLion8bit", "lion"),
    "sgd": (None, "torch.optim.SGD", None),
    "sgdnesterov": (None, "torch.optim.SGD", None),
    "sgdnesterov8bit": (_BNB, "bitsandbytes.optim.SGD8bit", "sgdnesterov"),
    "dadaptation": ("dadaptation", "dadaptation.DAdaptAdam", None),
    "dadaptadampreprint": ("dadaptation", "dadaptation.experimental.DAdaptAdamPreprint", None),
    "dadaptadagrad": ("dadaptation", "dadaptation.DAdaptAdaGrad", None),
    "dadaptadam": ("dadaptation", "dadaptation.DAdaptAdam", None),
    "dadaptadan": ("dadaptation", "dadaptation.DAdaptAdan", None),
    "dadaptadanip": ("dadaptation", "dadaptation.experimental.DAdaptAdanIP", None),
    "dadaptlion": ("dadaptation", "dadaptation.DAdaptLion", None),
    "dadaptsgd": ("dadaptation", "dadaptation.DAdaptSGD", None),
    "adafactor": ("transformers", "transformers.optimization.Adafactor", None),
    "prodigy": ("prodigyopt", "prodigyopt.Prodigy", None),
}
_PIP = {"lion_pytorch": "lion-pytorch"}


def make_optimizer(name: str, groups: list, args: list, messages: list):
    """kohya's optimizer of that name (or a `package.module.ClassName`), with its optimizer_args."""
    kw = kwargs_of(args)
    key = name.lower().replace("_", "") or "adamw"       # kohya's default, "", is AdamW
    if key not in OPTIMIZERS:
        if "." in name:
            return _by_path(name, groups, kw)
        raise ValueError(f"unknown optimizer_type {name!r}: one of {', '.join(OPTIMIZER_NAMES)}, or a "
                         "package.module.Class")
    package, path, fallback = OPTIMIZERS[key]
    if package == _BNB and not (torch.cuda.is_available() and importlib.util.find_spec(_BNB)):
        proper = next(n for n in OPTIMIZER_NAMES if n.lower() == fallback)
        messages.append(f"{name} needs CUDA and bitsandbytes; using {proper} (32-bit) instead")
        key = fallback
        package, path, _ = OPTIMIZERS[key]
    if package and not importlib.util.find_spec(package):
        pip = _PIP.get(package, package)
        raise ValueError(f"optimizer {name} needs the package {pip} (pip install {pip})")
    if key == "adamw":
        return _adamw(groups, kw)
    if key.startswith("sgdnesterov"):
        kw = {"momentum": 0.9, "nesterov": True, **kw}      # kohya's default momentum
    if key == "adafactor":
        return _adafactor(groups, kw, messages)
    return _import(path)(groups, **kw)


def _import(path: str):
    import importlib

    module, _, cls = path.rpartition(".")
    return getattr(importlib.import_module(module), cls)


def _by_path(name: str, groups: list, kw: dict):
    """kohya's last resort: any optimizer class by its full name (its package installed)."""
    module = name.rpartition(".")[0]
    if not importlib.util.find_spec(module.split(".")[0]):
        raise ValueError(f"optimizer_type {name}: no package {module.split('.')[0]} is installed")
    try:
        cls = _import(name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"optimizer_type {name}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"optimizer_type {name} is not a torch optimizer class")
    return cls(groups, **kw)


def current_lr(optimizer) -> float:
    """The first group's learning rate now; Adafactor's own where it sets it (relative_step)."""
    group = optimizer.param_groups[0]
    if group.get("lr") is not None:
        return float(group["lr"])
    state = optimizer.state.get(group["params"][0])
    get = getattr(type(optimizer), "_get_lr", None)
    return float(get(group, state)) if state and get else 0.0


def _adafactor(groups: list, kw: dict, messages: list):
    """kohya's Adafactor: relative_step unless told otherwise (warmup_init asks for it); then the optimizer
    sets its own learning rate, the groups' learning rates and the schedule are not used."""
    from transformers.optimization import Adafactor

    kw.setdefault("relative_step", True)
    if kw.get("warmup_init"):
        kw["relative_step"] = True
    if not kw["relative_step"]:
        return Adafactor(groups, **kw)
    for g in groups:
        g.pop("lr", None)
    messages.append("Adafactor with relative_step: it sets its own learning rate (the learning rates and the "
                    "lr_scheduler are not used, as in kohya)")
    return Adafactor(groups, lr=None, **kw)


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
