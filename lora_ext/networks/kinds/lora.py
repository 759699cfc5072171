"""LoRA and LoCon (kohya's networks.lora, LyCORIS's locon): up @ down, a kxk kernel in down or in a CP core."""
from __future__ import annotations

from .. import functional as fn
from .base import BadModule, NetworkType


class LoRA(NetworkType):
    name, title = "lora", "LoRA"
    parts = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
    conv_parts = ("lora_mid.weight",)
    main_part = "lora_down.weight"

    def detect(self, parts):
        return "lora_down.weight" in parts or "lora_up.weight" in parts

    def check(self, parts):
        self.need(parts, "lora_down.weight", "lora_up.weight")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        if up.ndim < 2 or down.ndim < 2 or up.shape[1] != down.shape[0]:
            raise BadModule(f"lora_up {list(up.shape)} and lora_down {list(down.shape)} disagree on the rank")

    def rank(self, parts):
        return int(parts["lora_down.weight"].shape[0])

    def delta(self, parts, scale, shape):
        return fn.lora_weight_delta(parts["lora_up.weight"], parts["lora_down.weight"], scale, parts.get("lora_mid.weight"))

    def out_in(self, parts):
        return int(parts["lora_up.weight"].shape[0]), int(parts["lora_down.weight"].shape[1])

    def low_rank(self, parts):
        if "lora_mid.weight" in parts:
            return None
        return parts["lora_up.weight"], parts["lora_down.weight"]
