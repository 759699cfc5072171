"""The network being trained, attached to a host's layers for the length of a run.

Linear and Conv2d layers with a low-rank module get a forward hook that adds the LoRA branch to their
output. Weight-form modules (LoHa, LoKr, DoRA), and weights an nn.MultiheadAttention uses directly (open_clip's
q/k/v rows and out_proj; no hook could see those), get a parametrization W + delta instead. `detach()` removes
both, leaving the layers as they were (same Parameter objects, same classes)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import naming
from ..networks.kinds import BY_NAME
from ..networks.kinds.trainable import Geometry, Options
from ..networks.stored import StoredModule
from . import network_args


class _AddDelta(nn.Module):
    """Parametrization of an MHA weight: W + the deltas of the modules on its row blocks (or on all of it)."""

    def __init__(self, parts):
        super().__init__()
        self.parts = parts      # [(TrainedModule, rows slice or None)]; not registered: the network owns them

    def forward(self, weight):
        deltas = torch.zeros_like(weight)
        for lora, rows in self.parts:
            if lora.dropped():
                continue
            d = lora.weight_delta(weight if rows is None else weight[rows]).to(weight.dtype)
            if rows is None:
                deltas = deltas + d
            else:
                deltas = deltas.index_add(0, torch.arange(rows.start, rows.stop, device=weight.device), d)
        return weight + deltas


def _in_dtype_of(lora, x):
    """x in the trained module's dtype: a host may run a frozen layer in a half dtype without autocast (Forge's
    text encoder on the CPU computes in fp16), while what is trained stays fp32. Under autocast x is left as it
    is: autocast picks the product's dtype itself (a cast up here would only be cast down again)."""
    if not x.is_floating_point() or _autocast(x.device.type):
        return x
    dtype = next(lora.parameters()).dtype
    return x if x.dtype == dtype else x.to(dtype)


def _autocast(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:        # a device autocast does not know (meta, in the memory estimate)
        return False


def _geometry(bound) -> Geometry:
    """The weight a module is made for: the target's own, or for a q/k/v row block a Linear's of that shape."""
    if bound.target.qkv is not None:
        return Geometry(bound.shape)
    layer = bound.module if not isinstance(bound.module, nn.MultiheadAttention) else bound.module.out_proj
    return Geometry.of(layer)


class TrainableNetwork(nn.Module):
    """One trained module (of `algo`'s type) per target layer; kxk convolutions (LoCon) only with a conv_dim."""

    def __init__(self, targets: dict, dim: int, alpha: float | None = None, conv_dim: int | None = None,
                 conv_alpha: float | None = None, options: Options = Options(), algo: str = "lora",
                 trained=lambda target: True, ranks: dict | None = None):
        """`ranks`: {kohya name: (rank, alpha)} of the modules to train, each its own (kohya's
        dim_from_weights: the layers and ranks of a file); else every target at dim / conv_dim."""
        super().__init__()
        self.bound = {}
        self.loras = nn.ModuleDict()
        make = BY_NAME[algo].trainable()
        for name, bound in targets.items():
            t = bound.target
            if not trained(t) or (ranks is None and t.locon and not conv_dim) or (ranks is not None and name not in ranks):
                continue
            rank, a = ranks[name] if ranks else (conv_dim, conv_alpha) if t.kind == naming.CONV else (dim, alpha)
            self.loras[name] = make(_geometry(bound), rank, a, options, bound.weight if options.dora else None)
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

    def attach(self, only=lambda bound: True) -> None:
        """Hooks the low-rank modules onto their layers' outputs; the weight-form ones (LoHa, LoKr, DoRA) and
        the weights an nn.MultiheadAttention uses directly become W + delta parametrizations instead: the layer
        then makes one product with its changed weight, where a hook would make a second one with the change
        (forward, and again in backward). `only(bound)` picks the layers (the memory estimate's UNet)."""
        weight_parts: dict = {}
        for name, lora in self.loras.items():
            bound = self.bound[name]
            if not only(bound):
                continue
            if bound.target.qkv is not None:
                weight_parts.setdefault((bound.module, "in_proj_weight"), []).append((lora, bound.rows))
            elif bound.owner is not None or lora.forms_weight:
                weight_parts.setdefault((bound.module, "weight"), []).append((lora, None))
            else:
                self._handles.append(bound.module.register_forward_hook(
                    lambda layer, args, out, lora=lora: out + lora(_in_dtype_of(lora, args[0]), layer.weight).to(out.dtype)))
        for (layer, pname), parts in weight_parts.items():
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
        """{kohya name: StoredModule} of the current weights (copies on the CPU, cast to `dtype` for saving)."""
        out = {}
        for name, lora in self.loras.items():
            s = StoredModule.of(lora)
            parts = {k: v.detach().to("cpu", dtype or v.dtype, copy=True) for k, v in s.parts.items()}
            out[name] = type(s)(s.network, parts, s.alpha)
        return out

    def load_stored(self, modules: dict) -> list:
        """Start from saved weights (resume, or `network_weights`); returns the names that fit nothing (absent
        here, or another type or layout)."""
        return [name for name, m in modules.items() if name not in self.loras or not self.loras[name].load(m)]


def network_for(host, spec: network_args.NetworkSpec) -> TrainableNetwork:
    """The network a run's options ask for (network_args.spec), on the parts whose learning rate is not 0."""
    ranks = ranks_of(spec.ranks_from, spec.algo, host.arch) if spec.ranks_from else None
    return TrainableNetwork(host.lora_targets(), spec.dim, spec.alpha, spec.conv_dim, spec.conv_alpha,
                            spec.options, spec.algo, trained=lambda t: spec.lrs[t.component] > 0, ranks=ranks)


def ranks_of(path: str, algo: str, arch) -> dict:
    """{kohya name: (rank, alpha)} of a LoRA file's modules (kohya's dim_from_weights); ValueError when they
    are of another type than the run trains."""
    from .. import files

    modules = files.read(path, arch).modules
    other = sorted({m.network for m in modules.values()} - {algo})
    if other:
        raise ValueError(f"dim_from_weights: {path} holds {', '.join(other)} modules; this run trains {algo} "
                         "(give network_args algo= of the file's type)")
    return {name: (m.rank, m.alpha) for name, m in modules.items()}
