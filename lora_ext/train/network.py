"""The LoRA being trained, attached to a host's layers for the length of a run.

Linear and Conv2d layers get a forward hook that adds the LoRA branch to their output. Weights that an
nn.MultiheadAttention uses directly (open_clip's q/k/v rows and out_proj) get a parametrization W + delta
instead: no hook could see those. `detach()` removes both, leaving the layers as they were (same Parameter
objects, same classes)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import naming
from ..networks.lora import LoRAModule
from ..networks.stored import StoredModule


class _AddDelta(nn.Module):
    """Parametrization of an MHA weight: W + the deltas of the LoRAs on its row blocks (or on all of it)."""

    def __init__(self, parts):
        super().__init__()
        self.parts = parts      # [(LoRAModule, rows slice or None)]; not registered: the network owns them

    def forward(self, weight):
        deltas = torch.zeros_like(weight)
        for lora, rows in self.parts:
            d = lora.weight_delta().to(weight.dtype)
            if rows is None:
                deltas = deltas + d
            else:
                deltas = deltas.index_add(0, torch.arange(rows.start, rows.stop, device=weight.device), d)
        return weight + deltas


def _shape_layer(bound) -> nn.Module:
    """The layer whose shape a LoRA takes: the target itself, or for a q/k/v row block a Linear of that shape."""
    if bound.target.qkv is None:
        return bound.module if not isinstance(bound.module, nn.MultiheadAttention) else bound.module.out_proj
    out_rows, in_f = bound.shape
    return nn.Linear(in_f, out_rows, bias=False, device="meta")


class TrainableNetwork(nn.Module):
    def __init__(self, targets: dict, dim: int, alpha: float | None = None, conv_dim: int | None = None,
                 conv_alpha: float | None = None, dropout: float = 0.0, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, trained=lambda target: True):
        super().__init__()
        self.bound = {}
        self.loras = nn.ModuleDict()
        for name, bound in targets.items():
            t = bound.target
            if not trained(t):
                continue
            if t.locon and not conv_dim:
                continue
            rank, a = (conv_dim, conv_alpha) if t.kind == naming.CONV else (dim, alpha)
            self.loras[name] = LoRAModule(_shape_layer(bound), rank, a, dropout, rank_dropout, module_dropout)
            self.bound[name] = bound
        self._handles = []
        self._parametrized = []

    def unet_parameters(self):
        return [p for n, m in self.loras.items() if self.bound[n].target.is_unet for p in m.parameters()]

    def te_parameters(self):
        return [p for n, m in self.loras.items() if not self.bound[n].target.is_unet for p in m.parameters()]

    def parameters_of(self, component: str) -> list:
        """The LoRA parameters on one part: 'unet', 'te' (SD1/SD2), 'te1' or 'te2' (SDXL)."""
        return [p for n, m in self.loras.items() if self.bound[n].target.component == component for p in m.parameters()]

    def attach(self) -> None:
        mha_parts: dict = {}
        for name, lora in self.loras.items():
            bound = self.bound[name]
            if bound.target.qkv is not None:
                mha_parts.setdefault((bound.module, "in_proj_weight"), []).append((lora, bound.rows))
            elif bound.owner is not None:
                mha_parts.setdefault((bound.module, "weight"), []).append((lora, None))
            else:
                self._handles.append(bound.module.register_forward_hook(
                    lambda layer, args, out, lora=lora: out + lora(args[0]).to(out.dtype)))
        for (layer, pname), parts in mha_parts.items():
            order = list(layer._parameters)
            parametrize.register_parametrization(layer, pname, _AddDelta(parts), unsafe=True)
            self._parametrized.append((layer, pname, order))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for layer, pname, order in self._parametrized:
            parametrize.remove_parametrizations(layer, pname, leave_parametrized=False)
            # removal registers the parameter again, last: give the layer its parameter order back
            params = layer._parameters
            layer._parameters = {k: params[k] for k in order if k in params} | params
        self._parametrized.clear()

    def stored(self, dtype=None) -> dict:
        """{kohya name: StoredModule} of the current weights (cast to `dtype` for saving)."""
        out = {}
        for name, lora in self.loras.items():
            s = lora.stored()
            parts = {k: v.detach().to("cpu", dtype or v.dtype, copy=True) for k, v in s.parts.items()}
            out[name] = StoredModule("lora", parts, s.alpha)
        return out

    def load_stored(self, modules: dict) -> list:
        """Start from saved weights (resume, or `network_weights`); returns the names that fit nothing."""
        missing = []
        with torch.no_grad():
            for name, m in modules.items():
                lora = self.loras[name] if name in self.loras else None
                pair = m.low_rank()         # None for other types, CP cores and DoRA: not what is trained here
                if lora is None or pair is None:
                    missing.append(name)
                    continue
                up, down = pair
                lora.lora_down.weight.copy_(down.reshape(lora.lora_down.weight.shape))
                lora.lora_up.weight.copy_(up.reshape(lora.lora_up.weight.shape))
        return missing


def network_for(host, cfg) -> TrainableNetwork:
    """The network a run's options ask for (LoCon's conv_dim/conv_alpha and the dropouts in network_args),
    on the parts whose learning rate is not 0."""
    args = cfg.net_args
    lrs = cfg.component_lrs()
    return TrainableNetwork(host.lora_targets(), cfg.network_dim, cfg.network_alpha,
                            int(args["conv_dim"]) if "conv_dim" in args else None,
                            float(args.get("conv_alpha", 1.0)), cfg.network_dropout,
                            float(args.get("rank_dropout", 0)), float(args.get("module_dropout", 0)),
                            trained=lambda t: lrs[t.component] > 0)
