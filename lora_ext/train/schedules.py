"""Learning-rate schedules (kohya's names): a factor of the base learning rate per optimizer step."""
from __future__ import annotations

import math

# "adafactor": kohya's schedule for the Adafactor optimizer, which sets its learning rate itself (or keeps it);
# inverse_sqrt, cosine_with_min_lr, warmup_stable_decay: transformers' (kohya passes them half its cycles)
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "adafactor", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")


def lr_factor(name: str, step: int, total: int, warmup: int = 0, cycles: int = 1, power: float = 1.0,
              lr: float = 1.0, lr_end: float = 1e-7, *, timescale: int | None = None,
              min_lr_ratio: float | None = None, decay: int = 0) -> float:
    """Factor at optimizer step `step` (0-based) of `total`. Warm-up rises linearly from 0 (all but
    'constant'). cosine: half a cosine to 0; cosine_with_restarts: `cycles` cosines, each restarting at the
    top; polynomial: (1 - progress)^power from `lr` (the run's learning_rate) down to `lr_end` (an absolute
    learning rate, 1e-7 as in kohya and diffusers), as a factor of `lr`. inverse_sqrt: 1/sqrt of the steps
    in `timescale`s (default: the warm-up, else 10000); cosine_with_min_lr: `cycles` half-cosines down to
    `min_lr_ratio`; warmup_stable_decay: 1 until the last `decay` steps, which fall on a half-cosine (per
    cycle) to `min_lr_ratio`."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown lr_scheduler {name!r}; one of {', '.join(SCHEDULERS)}")
    if name in ("constant", "adafactor"):
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if name == "constant_with_warmup":
        return 1.0
    if name in ("inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay"):
        return _transformers_kind(name, step, total, warmup, cycles, timescale, min_lr_ratio or 0.0, decay)
    progress = (step - warmup) / max(1, total - warmup)
    if name == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if name == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if name == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0))))
    if step > total:
        return lr_end / lr
    return ((lr - lr_end) * (1 - progress) ** power + lr_end) / lr


def _transformers_kind(name, step, total, warmup, cycles, timescale, floor, decay) -> float:
    if name == "inverse_sqrt":
        scale = timescale or warmup or 10_000
        return 1.0 / math.sqrt((step + scale - warmup) / scale)
    half_waves = cycles / 2          # kohya passes transformers num_cycles = its cycles / 2
    if name == "cosine_with_min_lr":
        progress = (step - warmup) / max(1, total - warmup)
        wave = 0.5 * (1.0 + math.cos(math.pi * half_waves * 2.0 * progress))
        return max(0.0, wave * (1 - floor) + floor)
    stable = total - warmup - decay
    if step < warmup + stable:
        return 1.0
    if step < warmup + stable + decay:
        progress = (step - warmup - stable) / max(1, decay)
        return (1.0 - floor) * max(0.0, 0.5 * (1.0 + math.cos(math.pi * half_waves * 2.0 * progress))) + floor
    return floor


def custom(name: str, args: list, optimizer):
    """kohya's lr_scheduler_type: a class of torch.optim.lr_scheduler by its name, or any package.module.Class,
    made on the optimizer with lr_scheduler_args (Python literals); stepped once per optimizer step."""
    import importlib
    import importlib.util

    import torch

    from .optim import kwargs_of

    module, _, cls = name.rpartition(".")
    module = module or "torch.optim.lr_scheduler"
    if not importlib.util.find_spec(module.split(".")[0]):
        raise ValueError(f"lr_scheduler_type {name}: no package {module.split('.')[0]} is installed")
    try:
        klass = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"lr_scheduler_type {name}: {e}") from None
    base = getattr(torch.optim.lr_scheduler, "LRScheduler", torch.optim.lr_scheduler._LRScheduler)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
    if not (isinstance(klass, type) and issubclass(klass, base)) or issubclass(klass, plateau):
        raise ValueError(f"lr_scheduler_type {name} is not a learning-rate scheduler stepped each step (torch's "
                         "LRScheduler; ReduceLROnPlateau needs a metric lora_ext does not give it)")
    try:
        return klass(optimizer, **kwargs_of(args))
    except TypeError as e:
        raise ValueError(f"lr_scheduler_args for {name}: {e}") from None


def zero_terminal_snr(alphas_cumprod):
    """The schedule rescaled so that its last timestep is pure noise (SNR 0) and its first unchanged: sqrt of
    alphas_cumprod shifted to end at 0 and scaled back to start where it did (Lin et al. 2023, "Common
    Diffusion Noise Schedules and Sample Steps are Flawed", algorithm 1)."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return (root ** 2).to(alphas_cumprod.dtype)
