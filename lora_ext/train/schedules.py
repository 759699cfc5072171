"""Learning-rate schedules (kohya's names): a factor of the base learning rate per optimizer step."""
from __future__ import annotations

import math

# "adafactor": kohya's schedule for the Adafactor optimizer, which sets its learning rate itself (or keeps it)
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "adafactor")


def lr_factor(name: str, step: int, total: int, warmup: int = 0, cycles: int = 1, power: float = 1.0,
              lr: float = 1.0, lr_end: float = 1e-7) -> float:
    """Factor at optimizer step `step` (0-based) of `total`. Warm-up rises linearly from 0 (all but
    'constant'). cosine: half a cosine to 0; cosine_with_restarts: `cycles` cosines, each restarting at the
    top; polynomial: (1 - progress)^power from `lr` (the run's learning_rate) down to `lr_end` (an absolute
    learning rate, 1e-7 as in kohya and diffusers), as a factor of `lr`."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown lr_scheduler {name!r}; one of {', '.join(SCHEDULERS)}")
    if name in ("constant", "adafactor"):
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if name == "constant_with_warmup":
        return 1.0
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


def zero_terminal_snr(alphas_cumprod):
    """The schedule rescaled so that its last timestep is pure noise (SNR 0) and its first unchanged: sqrt of
    alphas_cumprod shifted to end at 0 and scaled back to start where it did (Lin et al. 2023, "Common
    Diffusion Noise Schedules and Sample Steps are Flawed", algorithm 1)."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return (root ** 2).to(alphas_cumprod.dtype)
