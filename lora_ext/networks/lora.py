"""The LoRA module for Linear and Conv2d layers (Conv kxk = LoCon), as kohya builds it: `lora_down` takes the
layer's input (for a conv: the layer's kernel, stride and padding), `lora_up` is Linear / 1x1; down is
initialised kaiming-uniform, up with zeros, so a fresh module changes nothing; scale = alpha / rank with alpha
defaulting to rank. Its state dict keys (`lora_down.weight`, `lora_up.weight`, `alpha`) are kohya's."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import functional as fn
from .stored import StoredModule


class LoRAModule(nn.Module):
    def __init__(self, layer: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.rank = int(rank)
        alpha = float(self.rank if alpha in (None, 0) else alpha)
        self.scale = alpha / self.rank
        self.register_buffer("alpha", torch.tensor(alpha))
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        if isinstance(layer, nn.Conv2d):
            self.conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
            self.lora_down = nn.Conv2d(layer.in_channels, self.rank, layer.kernel_size, bias=False, **self.conv)
            self.lora_up = nn.Conv2d(self.rank, layer.out_channels, 1, bias=False)
        elif isinstance(layer, nn.Linear):
            self.conv = None
            self.lora_down = nn.Linear(layer.in_features, self.rank, bias=False)
            self.lora_up = nn.Linear(self.rank, layer.out_features, bias=False)
        else:
            raise TypeError(f"LoRA targets Linear and Conv2d layers, not {type(layer).__name__}")
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA branch: what this module adds to the layer's output for input x."""
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return torch.zeros((), dtype=x.dtype, device=x.device)
        h = self.lora_down(x)
        scale = self.scale
        if self.training and self.dropout:
            h = nn.functional.dropout(h, p=self.dropout)
        if self.training and self.rank_dropout:
            # drop whole ranks per sample, rescaled as if the rank had been smaller (kohya's rank dropout)
            mask = (torch.rand(h.shape[0], self.rank, device=h.device) > self.rank_dropout).to(h.dtype)
            h = h * mask.view(h.shape[0], *([1] * (h.ndim - 2)), self.rank).movedim(-1, 1 if self.conv else -1)
            scale = scale / (1.0 - self.rank_dropout)
        return self.lora_up(h) * scale

    def weight_delta(self) -> torch.Tensor:
        """delta W of the target layer (merged form), in the dtype of the module's weights."""
        return fn.lora_weight_delta(self.lora_up.weight, self.lora_down.weight, self.scale)

    def stored(self) -> StoredModule:
        return StoredModule("lora", {"lora_down.weight": self.lora_down.weight.detach(),
                                     "lora_up.weight": self.lora_up.weight.detach()}, float(self.alpha))
