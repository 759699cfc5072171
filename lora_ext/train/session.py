"""Everything a training run changes on the host's model, recorded first and put back afterwards, however
the run ends (finished, cancelled, out of memory, any exception): requires_grad, train/eval mode, device and
dtype of every parameter, ldm's own checkpointing flags, our gradient-checkpointing wrappers. The weights
themselves are never written by training (the LoRA lives in hooks), and the caller checks that."""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_LDM_FLAGS = ("checkpoint", "use_checkpoint")


class HostSession:
    """`blocks_for_checkpointing`: modules whose forward runs under torch's checkpoint for the session;
    `patches`: (module, forward) pairs installed for the session (e.g. faster attention); `frozen` (modules,
    dtype): their Linear / Conv2d weights held in `dtype` for the session (mixed precision: the products of
    the frozen model need no fp32 copy cast at every use; the LoRA stays fp32); the originals are kept and
    put back as they were, bit for bit."""

    def __init__(self, root: nn.Module, blocks_for_checkpointing=(), patches=(), frozen=((), None)):
        self.root = root
        self.blocks = list(blocks_for_checkpointing)
        self.patches = list(patches)
        self.frozen_modules, self.frozen_dtype = frozen
        self.originals: list = []

    def __enter__(self):
        self.requires_grad = {id(p): p.requires_grad for p in self.root.parameters()}
        self.training = {id(m): m.training for m in self.root.modules()}
        self.placement = {id(p): (p.device, p.dtype) for p in self.root.parameters()}
        self.flags = [(m, f, getattr(m, f)) for m in self.root.modules() for f in _LDM_FLAGS
                      if isinstance(getattr(m, f, None), bool)]
        self.root.requires_grad_(False)
        # ldm's checkpoint() recomputes with only the block's own parameters: a LoRA hooked inside such a
        # block would get no gradient. Ours (below) is torch's non-reentrant checkpoint, which sees them.
        for m, f, _ in self.flags:
            setattr(m, f, False)
        # a forward already set on the instance (by the host or another extension) is put back afterwards
        self.own_forwards = [(m, m.__dict__["forward"]) for m in self.blocks + [m for m, _ in self.patches]
                             if "forward" in m.__dict__]
        for module, forward in self.patches:
            module.forward = forward
        for block in self.blocks:
            block.forward = functools.partial(_checkpointed, block.forward)
        self._hold_frozen()
        return self

    def _hold_frozen(self) -> None:
        for p in held_parameters(self.frozen_modules, self.frozen_dtype):
            # on a GPU the original waits in CPU memory (VRAM holds the cast only)
            self.originals.append((p, p.data if p.device.type == "cpu" else p.data.to("cpu")))
            p.data = p.data.to(self.frozen_dtype)

    def __exit__(self, *exc):
        for p, data in self.originals:
            p.data = data.to(p.device)
        self.originals.clear()
        for module in self.blocks + [m for m, _ in self.patches]:
            module.__dict__.pop("forward", None)
        for module, forward in self.own_forwards:
            module.forward = forward
        for m, f, v in self.flags:
            setattr(m, f, v)
        params = {id(p): p for p in self.root.parameters()}
        for pid, p in params.items():
            device, dtype = self.placement[pid]
            if p.device != device or p.dtype != dtype:
                p.data = p.data.to(device, dtype)
            p.requires_grad_(self.requires_grad[pid])
            p.grad = None
        for m in self.root.modules():
            m.training = self.training[id(m)]
        return False


def frozen_roots(host) -> list:
    """The modules whose weights a mixed-precision run holds in its dtype: the UNet and the text encoders."""
    return [host.unet] + list(host.text_encoders())


def held_parameters(roots, dtype, through_forward: bool = False):
    """The Linear / Conv2d weights and biases under `roots` that a session holding them in `dtype` casts (norms
    and embeddings stay as they are: CPU group_norm refuses bf16 parameters under fp32 input)."""
    if dtype is None:
        return
    yield from (p for p in layer_parameters(roots, through_forward) if p.dtype != dtype)


def layer_parameters(roots, through_forward: bool = False):
    """The Linear / Conv2d weights and biases under `roots`. `through_forward`: only layers whose weights are
    used through their own forward (what train.upcast can cast up at use; an nn.MultiheadAttention reads its
    out_proj's weight directly)."""
    for root in roots:
        direct = {id(m.out_proj) for m in root.modules() if isinstance(m, nn.MultiheadAttention)}
        for m in root.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not (through_forward and id(m) in direct):
                yield from (p for p in (m.weight, m.bias) if p is not None)


def _checkpointed(forward, *args, **kwargs):
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)
