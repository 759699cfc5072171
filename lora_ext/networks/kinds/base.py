"""What every stored network type answers, given a module's parts {name: tensor} (alpha apart)."""
from __future__ import annotations

import torch


class BadModule(ValueError):
    """A module whose tensors do not form a network; the message names the problem."""


class NetworkType:
    name = ""               # as StoredModule.network and the files' ss_network_module say it
    title = ""              # in messages
    parts: tuple = ()       # the file parts this type stores
    conv_parts: tuple = ()  # parts only a kxk-convolution module has
    main_part = ""          # the part whose kernel tells a kxk convolution
    needs_base = False      # its change depends on the layer's own weight: delta_on(), not delta()
    algos: tuple = ()       # the LyCORIS `algo` names of this type (the first trains it, where it trains)
    help = ""               # the Train tab's words on it (types that train)
    factored = False        # a product of two factors every tool re-factors (resize, merge-LoRAs)
    layouts: tuple = ()     # other file layouts of this type that example() also draws (BOFT, GLoRA's first)

    def detect(self, parts: dict) -> bool:
        return any(p in parts for p in self.parts)

    def need(self, parts: dict, *names) -> None:
        missing = [n for n in names if n not in parts]
        if missing:
            raise BadModule(f"{self.name} module lacks {', '.join(missing)}")

    def check(self, parts: dict) -> None:
        """Raises BadModule when the parts cannot form a module of this type."""

    def rank(self, parts: dict) -> int | None:
        return None

    def delta(self, parts: dict, scale: float, shape: tuple) -> torch.Tensor:
        raise NotImplementedError

    def delta_on(self, parts: dict, scale: float, shape: tuple, base: torch.Tensor,
                 alpha: float | None) -> torch.Tensor:
        """The change of a type that scales or turns the layer's weight `base` (IA3, OFT)."""
        raise NotImplementedError

    def bias_delta(self, parts: dict) -> torch.Tensor | None:
        """The change to the layer's bias (full/diff, norm), None for the types that change the weight only."""
        return None

    def out_in(self, parts: dict) -> tuple[int, int] | None:
        """(out, in) features where the tensors tell them without the layer."""
        return None

    def fits(self, parts: dict, shape: tuple) -> bool:
        """Whether the module can be for a layer whose weight has `shape` (as far as its tensors tell)."""
        out_in = self.out_in(parts)
        return out_in is None or out_in == (shape[0], shape[1])

    def low_rank(self, parts: dict):
        """(up, down) when the module is a plain low-rank pair (delta = up @ down * scale), else None."""
        return None

    def is_conv(self, parts: dict) -> bool:
        if any(p in parts for p in self.conv_parts):
            return True
        main = parts.get(self.main_part)
        return main is not None and main.ndim == 4 and main.shape[2] * main.shape[3] > 1

    def trainable(self):
        """The TrainedModule class that trains this type (None: read and applied only)."""
        return None

    def example(self, shape: tuple, noise, bias=None, layout: str = "") -> dict | None:
        """A module's file parts ('alpha' included) with random values, for a layer whose weight has `shape`
        (and `bias`), None where this type does not sit on such a layer: what the tests' and benches' random
        networks are drawn from, so that a new type brings its own. `noise(*shape)` draws a tensor; `layout`:
        one of `layouts`. A type that trains draws its trained module's parameters (TrainedModule.example)."""
        return self.trainable().example(shape, noise)


class StoredChange(NetworkType):
    """A type whose file holds the change itself: `parts` = (the weight's change, the bias's change, which
    only a layer with a bias has). No rank, so no alpha scale (full/diff, norm)."""

    def check(self, parts):
        self.need(parts, self.parts[0])

    def delta(self, parts, scale, shape):
        return parts[self.parts[0]]

    def bias_delta(self, parts):
        return parts.get(self.parts[1])

    def example(self, shape, noise, bias=None, layout=""):
        return {self.parts[0]: noise(*shape), **({self.parts[1]: noise(*bias.shape)} if bias is not None else {})}
