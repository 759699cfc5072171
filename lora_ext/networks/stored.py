"""A network module as a file stores it: its tensors, rank and alpha, checks of its shapes, and the one
interface every type shares: `delta(shape)`, the weight change at weight 1. What each type means lives in
its own file under kinds/ (the registry); this class holds one module of any of them, and DoRA's magnitude
(`dora_scale`), which rescales any type's merged weight."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import functional as fn
from .kinds import BY_NAME, KNOWN_PARTS, BadModule, detect  # noqa: F401  (KNOWN_PARTS, BadModule: re-exported)


@dataclass
class StoredModule:
    network: str                    # a kinds.TYPES name: 'lora' | 'loha' | 'lokr' | 'ia3' | 'oft' | ...
    parts: dict = field(default_factory=dict)    # kohya part name -> tensor
    alpha: float | None = None

    @classmethod
    def of(cls, trained) -> "StoredModule":
        """The module as a file stores it, from a trained one (kinds.trainable.TrainedModule), sharing its
        tensors."""
        return cls(trained.network, trained.file_parts(), float(trained.alpha))

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
        module = cls(detect(parts).name, parts, alpha)
        module.check()
        return module

    @property
    def kind(self):
        return BY_NAME[self.network]

    def check(self) -> None:
        for name, t in self.parts.items():
            if t.numel() == 0:
                raise BadModule(f"{name} is empty (shape {list(t.shape)})")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise BadModule(f"{name} holds NaN or Inf values (saved from a diverged training, or damaged)")
        self._dry_run()

    def _dry_run(self) -> None:
        """The type's own check, its maths on meta tensors (no memory, no time) and what tools ask of it:
        parts whose shapes lie (a 0-d factor, a core or a product of another size, factors whose inner ranks
        disagree) fail here, when the file is read, never later inside a tool or the panel. A type whose
        change needs the layer's weight is held to its own check() and the questions alone."""
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in self.parts.items())
        try:
            self.kind.check(self.parts)
            self.rank, self.out_in(), self.is_conv, self.low_rank()
            if not self.kind.needs_base:
                meta = {k: torch.empty(v.shape, dtype=torch.float32, device="meta") for k, v in self.parts.items()}
                self.kind.delta(meta, 1.0, (-1,))
        except BadModule:
            raise
        except (RuntimeError, ValueError, IndexError, TypeError):
            raise BadModule(f"its tensors' shapes do not form a {self.kind.title} module ({shapes})") from None

    @property
    def rank(self) -> int | None:
        return self.kind.rank(self.parts)

    @property
    def scale(self) -> float:
        """alpha / rank; an absent alpha means alpha = rank (kohya's rule), a full LoKr factor means 1."""
        if self.alpha is None or self.rank is None:
            return 1.0
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        """A kxk convolution module (LoCon), as opposed to Linear or 1x1."""
        return self.kind.is_conv(self.parts)

    @property
    def is_dora(self) -> bool:
        """Weight-decomposed (DoRA): its change depends on the layer's own weight (`delta(shape, base)`)."""
        return "dora_scale" in self.parts

    @property
    def needs_base(self) -> bool:
        """Its change depends on the layer's own weight (DoRA's magnitude; IA3 and OFT scale or turn it)."""
        return self.is_dora or self.kind.needs_base

    def low_rank(self):
        """(up, down) of a plain low-rank module (delta = up @ down * scale: what resize, merge-LoRAs and the
        fast merge path compute with), else None (other types, CP cores, DoRA)."""
        return None if self.is_dora else self.kind.low_rank(self.parts)

    def delta(self, shape, base: torch.Tensor | None = None) -> torch.Tensor:
        """The weight change at weight 1 (alpha/rank applied), in fp32 (fp64 for fp64 parts: never narrower
        than fp32, so fp16/bf16 files lose nothing more in the product), reshaped to the target `shape`.
        `base` is the layer's weight before it (any dtype, taken only by a module that `needs_base`)."""
        wide = torch.float64 if any(v.dtype == torch.float64 for v in self.parts.values()) else torch.float32
        p = {k: v.to(wide) for k, v in self.parts.items()}
        shape = tuple(shape)
        if self.needs_base and base is None:
            raise BadModule(f"a {'DoRA' if self.is_dora else self.kind.title} module's change depends on the "
                            "layer's weight, which was not given")
        if self.kind.needs_base:
            d = self.kind.delta_on(p, self.scale, shape, base.to(wide).reshape(shape), self.alpha)
        else:
            d = self.kind.delta(p, self.scale, shape)
        if d.numel() != math.prod(shape):
            raise BadModule(f"its delta has {list(d.shape)} elements, the layer {list(shape)}")
        d = d.reshape(shape)
        if self.is_dora:
            d = fn.dora_delta(d, base.to(d.dtype), p["dora_scale"])
        return d

    def bias_delta(self, shape) -> torch.Tensor | None:
        """The change to the layer's bias at weight 1 (full/diff, norm), fp32 or wider, in `shape`; else None."""
        b = self.kind.bias_delta(self.parts)
        if b is None:
            return None
        if b.numel() != math.prod(shape):
            raise BadModule(f"its bias change has {list(b.shape)} elements, the layer's bias {list(shape)}")
        return b.to(torch.float64 if b.dtype == torch.float64 else torch.float32).reshape(tuple(shape))

    @property
    def changes_bias(self) -> bool:
        """Whether it changes the layer's bias too (full/diff with diff_b, norm with b_norm)."""
        return self.kind.bias_delta(self.parts) is not None

    def change(self, part: str, shape, base: torch.Tensor | None = None) -> torch.Tensor:
        """delta() for part 'weight', bias_delta() for 'bias': what the engines add to the tensor they hold."""
        return self.bias_delta(shape) if part == "bias" else self.delta(shape, base)

    def fits_bias(self, shape) -> bool:
        """Whether its bias change (if any) fits a bias of `shape` (None: the layer has no bias)."""
        b = self.kind.bias_delta(self.parts)
        return b is None or (shape is not None and b.numel() == math.prod(shape))

    def fits(self, shape) -> bool:
        """Whether the module can be for a layer whose weight has `shape`, as far as its tensors tell (a DoRA
        magnitude included: one per input or per output channel)."""
        shape = tuple(shape)
        if self.is_dora and fn.dora_axis(self.parts["dora_scale"], shape) is None:
            return False
        return self.kind.fits(self.parts, shape)

    def out_in(self) -> tuple[int, int] | None:
        """(out, in) features the module was made for, where the tensors tell it without the layer."""
        return self.kind.out_in(self.parts)
