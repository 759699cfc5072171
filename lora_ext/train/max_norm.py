"""kohya's --scale_weight_norms (networks/lora.py, apply_max_norm_regularization): after each optimizer step,
a LoRA module whose weight change (up @ down times alpha/rank) has a Frobenius norm above the limit has its up
and down weights scaled by the square root of limit/norm, so that the change's norm is the limit."""
from __future__ import annotations

import torch

# the network types whose modules are a product of lora_up and lora_down (kohya's LoRA, LoCon)
SCALED_TYPES = ("lora",)


@torch.no_grad()
def apply(network, limit: float) -> tuple[int, float, float]:
    """(modules scaled, mean norm after, largest norm after)."""
    scaled, norms = 0, []
    for module in network.loras.values():
        norm = (module.raw_delta().float() * module.scale).norm()
        ratio = float(limit / norm) if norm > limit else 1.0
        if ratio != 1.0:
            scaled += 1
            module.lora_up.weight.mul_(ratio ** 0.5)
            module.lora_down.weight.mul_(ratio ** 0.5)
        norms.append(float(norm) * ratio)
    return scaled, sum(norms) / max(len(norms), 1), max(norms, default=0.0)
