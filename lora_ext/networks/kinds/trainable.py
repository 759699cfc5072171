"""What every trained module shares, whatever its type: alpha and scale, the dropouts, DoRA's magnitude, the
forward pass through its weight change, and its file parts. A type adds its factors (`build`) and how they
multiply into the layer's weight change (`raw_delta`); LoRA also has a faster forward (kinds/lora.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as fn


@dataclass(frozen=True)
class Geometry:
    """The target weight a module is made for: its shape (out, in, *kernel) and, for a Conv2d, the
    convolution's stride/padding/dilation (None for a Linear)."""
    shape: tuple
    conv: dict | None = None

    @classmethod
    def of(cls, layer: nn.Module) -> "Geometry":
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1:
                raise TypeError("grouped convolutions are not trained")
            return cls(tuple(layer.weight.shape), dict(stride=layer.stride, padding=layer.padding,
                                                       dilation=layer.dilation))
        weight = getattr(layer, "weight", None)
        if isinstance(layer, nn.Linear) or (isinstance(weight, torch.Tensor) and weight.ndim == 2):
            # a host's own Linear (Forge's is a plain Module computing x @ W.T + b) is trained as one
            return cls(tuple(weight.shape))
        raise TypeError(f"network modules target Linear and Conv2d layers, not {type(layer).__name__}")

    @property
    def out(self) -> int:
        return self.shape[0]

    @property
    def inp(self) -> int:
        return self.shape[1]

    @property
    def kernel(self) -> tuple:
        return tuple(self.shape[2:])

    @property
    def kxk(self) -> bool:
        return any(k != 1 for k in self.kernel)


@dataclass(frozen=True)
class Options:
    """A run's per-module choices (kohya / LyCORIS network_args)."""
    dropout: float = 0.0            # of LoRA's rank activations (kohya's network_dropout)
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    dora: bool = False              # weight-decomposed (LyCORIS dora_wd)
    dora_on_output: bool = False    # its magnitude per output channel (LyCORIS wd_on_output), not per input
    tucker: bool = False            # a CP core for kxk kernels (LyCORIS use_tucker)
    factor: int = -1                # LoKr
    decompose_both: bool = False    # LoKr: the first factor low-rank too
    full_matrix: bool = False       # LoKr: the second factor full


class TrainedModule(nn.Module):
    """A module being trained on one layer. Subclasses set `network` (a kinds.TYPES name) and define
    `build(geo, rank, opts)` and `raw_delta()`, the weight change before alpha/rank."""
    network = ""

    def __init__(self, geo: Geometry, rank: int, alpha: float | None = None, opts: Options = Options(),
                 base: torch.Tensor | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.geo, self.rank, self.opts = geo, int(rank), opts
        alpha = float(self.rank if alpha in (None, 0) else alpha)
        self.scale = alpha / self.rank
        self.register_buffer("alpha", torch.tensor(alpha))
        self.build(geo, self.rank, opts)
        if opts.dora:
            if base is None:
                raise ValueError("a DoRA module starts from the layer's weight, which was not given")
            # the layer's own norms: a fresh module changes nothing
            norm = fn.dora_norm(base.detach().float(), opts.dora_on_output)
            self.dora_scale = nn.Parameter(norm.to(self.alpha.device))

    @classmethod
    def example(cls, shape: tuple, noise) -> dict:
        """File parts ('alpha' included) of a rank-4 module for a layer whose weight has `shape`, its parameters
        drawn by `noise(*shape)` (kinds.base.NetworkType.example)."""
        conv = dict(stride=1, padding=1, dilation=1) if len(shape) == 4 else None
        module = cls(Geometry(tuple(shape), conv), 4, 2.0)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(noise(*p.shape))
        return {**module.file_parts(), "alpha": module.alpha.clone()}

    def build(self, geo: Geometry, rank: int, opts: Options) -> None:
        raise NotImplementedError

    def raw_delta(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def dora(self) -> bool:
        return self.opts.dora

    @property
    def forms_weight(self) -> bool:
        """Whether the forward builds the layer's whole weight change each step (the memory estimate counts it)."""
        return True

    def weight_delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """delta W of the target layer at weight 1 (merged form); DoRA needs the layer's weight `base`.
        In training, rank dropout drops whole output rows (LyCORIS's rank dropout for weight-form types),
        rescaled so the expected change stays."""
        d = self.raw_delta().reshape(self.geo.shape) * self.scale
        if self.training and self.opts.rank_dropout:
            keep = (torch.rand(d.shape[0], device=d.device) > self.opts.rank_dropout).to(d.dtype)
            d = d * keep.view(-1, *[1] * (d.ndim - 1)) / (1.0 - self.opts.rank_dropout)
        if self.dora:
            d = fn.dora_delta(d, base.detach().to(d.dtype), self.dora_scale)
        return d

    def dropped(self) -> bool:
        return bool(self.training and self.opts.module_dropout and torch.rand(()) < self.opts.module_dropout)

    def forward(self, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """What this module adds to the layer's output for input x."""
        if self.dropped():
            return torch.zeros((), dtype=x.dtype, device=x.device)
        d = self.weight_delta(base).to(x.dtype)
        return F.linear(x, d) if self.geo.conv is None else F.conv2d(x, d, **self.geo.conv)

    def file_parts(self) -> dict:
        """The tensors a file stores of it (shared with this module), alpha apart: networks.stored.StoredModule.of
        makes the stored module."""
        return {k: v.detach() for k, v in self.state_dict(keep_vars=True).items() if k != "alpha"}

    def load(self, stored) -> bool:
        """Start from a stored module of the same type and layout (resume a file, `network_weights`);
        False, with nothing changed, when it is another."""
        own = {k: v for k, v in self.state_dict(keep_vars=True).items() if k != "alpha"}
        if stored.network != self.network or set(stored.parts) != set(own):
            return False
        if any(stored.parts[k].numel() != v.numel() for k, v in own.items()):
            return False
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(stored.parts[k].reshape(v.shape))
        return True
