"""A network module as a file stores it (LoRA/LoCon, LoHa, LoKr): its tensors, rank and alpha, checks of
its shapes, and the one interface every type shares: `delta(shape)`, the weight change at weight 1."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import functional as fn

LORA_PARTS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
KNOWN_PARTS = frozenset(LORA_PARTS + LOHA_PARTS + LOKR_PARTS + ("alpha", "dora_scale"))


class BadModule(ValueError):
    """A module whose tensors do not form a network; the message names the problem."""


@dataclass
class StoredModule:
    network: str                    # 'lora' | 'loha' | 'lokr'
    parts: dict = field(default_factory=dict)    # kohya part name -> tensor
    alpha: float | None = None

    @classmethod
    def from_parts(cls, parts: dict) -> "StoredModule":
        parts = dict(parts)
        alpha_t = parts.pop("alpha", None)
        alpha = None
        if alpha_t is not None:
            if alpha_t.numel() != 1:
                raise BadModule(f"alpha must be one number, it has shape {list(alpha_t.shape)}")
            alpha = float(alpha_t.float().item())
            if alpha != alpha or alpha in (float("inf"), float("-inf")):
                raise BadModule(f"alpha is {alpha}")
        if "lora_down.weight" in parts or "lora_up.weight" in parts:
            network = "lora"
        elif any(k.startswith("hada_") for k in parts):
            network = "loha"
        elif any(k.startswith("lokr_") for k in parts):
            network = "lokr"
        else:
            raise BadModule(f"its tensors ({', '.join(sorted(parts)) or 'none'}) form no LoRA, LoHa or LoKr module")
        module = cls(network, parts, alpha)
        module.check()
        return module

    def _need(self, *names):
        missing = [n for n in names if n not in self.parts]
        if missing:
            raise BadModule(f"{self.network} module lacks {', '.join(missing)}")

    def check(self) -> None:
        for name, t in self.parts.items():
            if t.numel() == 0:
                raise BadModule(f"{name} is empty (shape {list(t.shape)})")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise BadModule(f"{name} holds NaN or Inf values (saved from a diverged training, or damaged)")
        p = self.parts
        if self.network == "lora":
            self._need("lora_down.weight", "lora_up.weight")
            down, up = p["lora_down.weight"], p["lora_up.weight"]
            if up.ndim < 2 or down.ndim < 2 or up.shape[1] != down.shape[0]:
                raise BadModule(f"lora_up {list(up.shape)} and lora_down {list(down.shape)} disagree on the rank")
        elif self.network == "loha":
            self._need("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
            if "hada_t1" not in p and p["hada_w1_a"].shape[1] != p["hada_w1_b"].shape[0]:
                raise BadModule(f"hada_w1_a {list(p['hada_w1_a'].shape)} and hada_w1_b "
                                f"{list(p['hada_w1_b'].shape)} disagree on the rank")
            if "hada_t2" not in p and p["hada_w2_a"].shape[1] != p["hada_w2_b"].shape[0]:
                raise BadModule(f"hada_w2_a {list(p['hada_w2_a'].shape)} and hada_w2_b "
                                f"{list(p['hada_w2_b'].shape)} disagree on the rank")
        else:
            if "lokr_w1" not in p:
                self._need("lokr_w1_a", "lokr_w1_b")
            if "lokr_w2" not in p:
                self._need("lokr_w2_a", "lokr_w2_b")

    @property
    def rank(self) -> int | None:
        p = self.parts
        if self.network == "lora":
            return int(p["lora_down.weight"].shape[0])
        if self.network == "loha":
            return int(p["hada_w1_b"].shape[0])
        for k in ("lokr_w1_b", "lokr_w2_b"):
            if k in p:
                return int(p[k].shape[0])
        return None

    @property
    def scale(self) -> float:
        """alpha / rank; an absent alpha means alpha = rank (kohya's rule), a full LoKr factor means 1."""
        if self.alpha is None or self.rank is None:
            return 1.0
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        """A kxk convolution module (LoCon), as opposed to Linear or 1x1."""
        if "lora_mid.weight" in self.parts or "hada_t1" in self.parts or "lokr_t2" in self.parts:
            return True
        main = next((self.parts[k] for k in ("lora_down.weight", "hada_w1_b", "lokr_w2") if k in self.parts), None)
        return main is not None and main.ndim == 4 and main.shape[2] * main.shape[3] > 1

    @property
    def is_dora(self) -> bool:
        """Weight-decomposed (DoRA): its change depends on the layer's own weight (`delta(shape, base)`)."""
        return "dora_scale" in self.parts

    def delta(self, shape, base: torch.Tensor | None = None) -> torch.Tensor:
        """The weight change at weight 1 (alpha/rank applied), in fp32 (fp64 for fp64 parts: never narrower
        than fp32, so fp16/bf16 files lose nothing more in the product), reshaped to the target `shape`.
        A DoRA module needs `base`, the layer's weight before it."""
        wide = torch.float64 if any(v.dtype == torch.float64 for v in self.parts.values()) else torch.float32
        p = {k: v.to(wide) for k, v in self.parts.items()}
        shape = tuple(shape)
        if self.network == "lora":
            d = fn.lora_weight_delta(p["lora_up.weight"], p["lora_down.weight"], self.scale, p.get("lora_mid.weight"))
        elif self.network == "loha":
            d = fn.loha_weight_delta(p["hada_w1_a"], p["hada_w1_b"], p["hada_w2_a"], p["hada_w2_b"], self.scale,
                                     shape, p.get("hada_t1"), p.get("hada_t2"))
        else:
            w1 = fn.lokr_factor(p.get("lokr_w1"), p.get("lokr_w1_a"), p.get("lokr_w1_b"))
            w2 = fn.lokr_factor(p.get("lokr_w2"), p.get("lokr_w2_a"), p.get("lokr_w2_b"), p.get("lokr_t2"))
            d = fn.lokr_weight_delta(w1, w2, self.scale, shape)
        if d.numel() != _numel(shape):
            raise BadModule(f"its delta has {list(d.shape)} elements, the layer {list(shape)}")
        d = d.reshape(shape)
        if self.is_dora:
            if base is None:
                raise BadModule("a DoRA module's change depends on the layer's weight, which was not given")
            d = fn.dora_delta(d, base.to(d.dtype), p["dora_scale"])
        return d

    def out_in(self) -> tuple[int, int] | None:
        """(out, in) features the module was made for, where the tensors tell it without the layer."""
        p = self.parts
        if self.network == "lora":
            return int(p["lora_up.weight"].shape[0]), int(p["lora_down.weight"].shape[1])
        if self.network == "loha" and "hada_t1" not in p:
            return int(p["hada_w1_a"].shape[0]), int(p["hada_w1_b"].shape[1])
        return None


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
