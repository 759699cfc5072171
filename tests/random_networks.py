"""Random networks on a model's layers, for the tests and the benches: every network type draws its own
module parts (networks.kinds: NetworkType.example), so a new type is covered here without a line added."""
from __future__ import annotations

import torch

from lora_ext import naming
from lora_ext.hosts import for_model
from lora_ext.networks.kinds import TYPES
from lora_ext.networks.kinds.lora import LoRAModule
from lora_ext.networks.kinds.trainable import Geometry
from lora_ext.networks.stored import StoredModule


def make_random_lora(sd_model, rank: int = 4, alpha: float = 2.0, conv_rank: int | None = 2, seed: int = 0) -> dict:
    """{kohya name: StoredModule} with nonzero weights for every target of `sd_model` (conv_rank None: no
    kxk convolutions)."""
    torch.manual_seed(seed)
    modules = {}
    for t in naming.targets(naming.arch_from_model(sd_model)):
        if t.locon and conv_rank is None:
            continue
        layer = sd_model.get_submodule(t.webui)
        if t.qkv is not None:
            dim = layer.embed_dim
            layer = torch.nn.Linear(dim, dim, bias=False)
        r = conv_rank if t.kind == naming.CONV else rank
        m = LoRAModule(Geometry.of(layer), r, alpha if t.kind != naming.CONV else 1.0)
        torch.nn.init.normal_(m.lora_up.weight, std=0.01)
        modules[t.kohya] = StoredModule.of(m)
    return modules


def make_random_dora(sd_model, seed: int = 3) -> dict:
    """make_random_lora's LoCon with a DoRA magnitude (`dora_scale`, one per input channel) near the merged
    weight's own column norms, so that the decomposition changes the result."""
    targets = for_model(sd_model).lora_targets()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in make_random_lora(sd_model, rank=4, alpha=4.0, conv_rank=2, seed=seed).items():
        w0 = targets[name].weight.detach().float()
        norms = (w0 + m.delta(w0.shape)).transpose(0, 1).reshape(w0.shape[1], -1).norm(dim=1)
        magnitude = (norms * (1 + 0.2 * torch.rand(norms.shape, generator=g))).reshape(1, -1, *[1] * (w0.ndim - 2))
        out[name] = StoredModule("lora", {**m.parts, "dora_scale": magnitude}, m.alpha)
    return out


def network_names() -> list:
    """Every name make_random_network draws: each type's, then its other layouts'."""
    return [t.name for t in TYPES] + [layout for t in TYPES for layout in t.layouts]


def make_random_network(sd_model, network: str, seed: int = 5, conv: bool = True) -> dict:
    """{kohya name: StoredModule} of one type (a kinds.TYPES name, or one of a type's `layouts`) with random
    nonzero weights on every layer of `sd_model` where the type sits (Conv2d layers, 1x1 ones too, only with
    `conv`): 'full' also on the UNet's conv_in / conv_out / embeddings, 'norm' only on norm layers."""
    kind = next(t for t in TYPES if network in (t.name, *t.layouts))
    layout = "" if network == kind.name else network
    host = for_model(sd_model)
    g = torch.Generator().manual_seed(seed)
    noise = lambda *s: torch.randn(s, generator=g) * 0.1  # noqa: E731
    out = {}
    targets = host.applied_targets() if network in ("full", "norm") else host.lora_targets()
    for name, bound in targets.items():
        if (len(bound.shape) == 4 and not conv) or bound.target.qkv is not None or bound.owner is not None:
            continue
        if (bound.target.kind == naming.NORM) != (network == "norm"):
            continue
        parts = kind.example(bound.shape, noise, bound.bias(), layout)
        if parts is not None:
            out[name] = StoredModule.from_parts(parts)
    return out
