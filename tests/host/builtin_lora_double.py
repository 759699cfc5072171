"""A double of the webui built-in Lora's weight handling (extensions-builtin/Lora/networks.py, 1.10.1), for
stacking tests. Behaviour reproduced, as read from that source:
- before a Linear/Conv2d/MultiheadAttention computes, `network_apply_weights(layer)` runs;
- wanted = the loaded networks' (name, te multiplier, unet multiplier, dyn dim); if the layer has no
  backup and wanted is non-empty, it copies the weight to the CPU (`network_weights_backup`; a pair
  (in_proj_weight, out_proj.weight) for a MultiheadAttention) — raising if it had applied names without one;
- if wanted differs from `network_current_names`, it copies the backup back, adds each network's delta
  (te multiplier when 'transformer' is in the first 20 characters of the layer's sd key, else unet), and
  records wanted as current;
- loading a state dict into a layer resets its names and drops its backups.
"""
import torch
from torch import nn

loaded_networks = []


class Net:
    def __init__(self, name, deltas, te=1.0, unet=1.0):
        self.name, self.deltas, self.te_multiplier, self.unet_multiplier = name, deltas, te, unet

    def multiplier(self, sd_key):
        return self.te_multiplier if "transformer" in sd_key[:20] else self.unet_multiplier


def random_net(model, name, seed, scale=0.01):
    """A network touching every Linear/Conv2d (and MHA q/k/v/out) of the model with random deltas."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for layer_name, layer in layers(model).items():
        if isinstance(layer, nn.MultiheadAttention):
            d = layer.embed_dim
            deltas[layer_name] = ("mha", torch.randn(3 * d, d, generator=g) * scale, torch.randn(d, d, generator=g) * scale)
        elif isinstance(layer, (nn.Linear, nn.Conv2d)):
            deltas[layer_name] = ("plain", torch.randn(layer.weight.shape, generator=g) * scale)
    return Net(name, deltas)


def layers(model):
    """The built-in's network_layer_mapping: module paths under the text encoder holder and under
    sd_model.model, '.' -> '_'."""
    out = {}
    holders = ([e.wrapped for e in model.conditioner.embedders] if getattr(model, "is_sdxl", False)
               else [model.cond_stage_model.wrapped])
    for i, holder in enumerate(holders):
        for name, m in holder.named_modules():
            out[(f"{i}_" if len(holders) > 1 else "") + name.replace(".", "_")] = m
    for name, m in model.model.named_modules():
        out[name.replace(".", "_")] = m
    # an MHA's out_proj is in the built-in's mapping too, but the MHA computes with its weight directly and
    # never calls it; the built-in changes that weight through the MHA, and so does this double
    inner = {id(m.out_proj) for m in out.values() if isinstance(m, nn.MultiheadAttention)}
    return {k: m for k, m in out.items()
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.MultiheadAttention)) and id(m) not in inner}


@torch.no_grad()     # the webui generates under no_grad
def network_apply_weights(layer, layer_name):
    current = getattr(layer, "network_current_names", ())
    wanted = tuple((n.name, n.te_multiplier, n.unet_multiplier, 1.0) for n in loaded_networks)
    mha = isinstance(layer, nn.MultiheadAttention)
    backup = getattr(layer, "network_weights_backup", None)
    if backup is None and wanted != ():
        if current != ():
            raise RuntimeError(f"{layer_name} - no backup weights found and current weights are not unchanged")
        backup = ((layer.in_proj_weight.to("cpu", copy=True), layer.out_proj.weight.to("cpu", copy=True)) if mha
                  else layer.weight.to("cpu", copy=True))
        layer.network_weights_backup = backup
    if current != wanted:
        with torch.no_grad():
            if backup is not None:
                if mha:
                    layer.in_proj_weight.copy_(backup[0])
                    layer.out_proj.weight.copy_(backup[1])
                else:
                    layer.weight.copy_(backup)
            for net in loaded_networks:
                entry = net.deltas.get(layer_name)
                if entry is None:
                    continue
                m = net.multiplier(layer_name)
                if entry[0] == "mha":
                    layer.in_proj_weight += entry[1].to(layer.in_proj_weight.dtype) * m
                    layer.out_proj.weight += entry[2].to(layer.out_proj.weight.dtype) * m
                else:
                    layer.weight.copy_((layer.weight.float() + entry[1] * m).to(layer.weight.dtype))
        layer.network_current_names = wanted


def install(model):
    """Patch the model's layers as the built-in patches their classes' forward and load_state_dict."""
    handles = []
    for layer_name, layer in layers(model).items():
        handles.append(layer.register_forward_pre_hook(lambda mod, args, n=layer_name: network_apply_weights(mod, n)))
        handles.append(layer._register_load_state_dict_pre_hook(lambda *a, mod=layer: reset(mod)))
    return handles


def reset(layer):
    layer.network_current_names = ()
    layer.network_weights_backup = None


def touch_all(model):
    """What a generation does to every layer: run its pre-forward step (some layers, e.g. an MHA's
    out_proj, are never called themselves)."""
    for layer_name, layer in layers(model).items():
        network_apply_weights(layer, layer_name)


def expected_delta(model, net):
    """{(layer, param name): delta} that `net` adds, for building expectations."""
    out = {}
    for layer_name, layer in layers(model).items():
        entry = net.deltas.get(layer_name)
        if entry is None:
            continue
        m = net.multiplier(layer_name)
        if entry[0] == "mha":
            out[(layer, "in_proj_weight")] = entry[1] * m
            out[(layer.out_proj, "weight")] = entry[2] * m
        else:
            out[(layer, "weight")] = entry[1] * m
    return out
