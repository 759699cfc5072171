"""The on-the-fly engine: weighted LoRA deltas onto a host's loaded model, and exact restore.

`Engine.apply(host, requests)` makes every matched layer compute W0 + sum_i w_i * scale_i * delta_i, where
W0 is the layer's weight before any network. Two modes:
- merge (default): the sum is written into the weights, so sampling costs nothing extra. W0 is kept (on the
  CPU) for every touched weight, and a weight is only rewritten when what it should hold changed (a weight,
  a file on disk, the set of LoRAs touching it). Each write starts from W0, so a state always produces the
  same bits whatever came before, and restoring is a plain copy of W0: bit-exact, no arithmetic.
- bypass: forward hooks add w * up(down(x)) to the layer's output; no weight changes. Used where merging
  cannot serve (asked for, or a layer whose weight must not change). nn.MultiheadAttention layers (open_clip
  text encoders) cannot be hooked this way and are merged; the report says so.
State is kept per model object, so a second model kept in memory is restored when it is next used; after the
webui reloads weights into a model, `forget(model)` drops the state without writing.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field

import torch

from . import files, regions
from .cache import LoraCache

MERGE, BYPASS = "merge", "bypass"


@dataclass(frozen=True)
class Request:
    path: str
    unet: float = 1.0
    te: float = 1.0
    name: str = ""
    blocks: tuple = ()      # ((block id, factor), ...): per-block weights (blocks.parse), folded into module weights
    mask: object = None     # masks.Mask: the UNet part only where it is white (bypass hooks, whatever the mode)
    start: float = 0.0      # the UNet part from this fraction of the sampling steps ...
    stop: float = 1.0       # ... to this one (Engine.apply's `at`); the text encoder's acts on the whole prompt

    def weight_of(self, target) -> float:
        """The weight of one module: the slot's UNet or text-encoder weight times its block's factor."""
        weight = self.unet if target.is_unet else self.te
        if self.blocks:
            from .blocks import block_of
            weight *= dict(self.blocks).get(block_of(target), 1.0)
        return weight

    @property
    def scheduled(self) -> bool:
        return self.start > 0 or self.stop < 1

    def active_at(self, at: float | None) -> bool:
        """Whether the UNet part acts at fraction `at` of the sampling steps (None: before sampling, = 0)."""
        return self.start <= (at or 0.0) < self.stop


@dataclass
class Report:
    applied: list = field(default_factory=list)     # {"name", "modules", "mode"} per LoRA in use
    warnings: list = field(default_factory=list)
    written: int = 0                                 # weights rewritten by this call
    restored: int = 0                                # weights given back their original
    seconds: float = 0.0


@dataclass
class _Contribution:
    source: tuple          # (path, stamp) of the file: a changed file is a changed contribution
    name: str              # kohya module name
    module: object         # StoredModule
    weight: float
    rows: slice | None
    part: str = "weight"   # or 'bias': full/diff and norm modules change the layer's bias too
    mask: object = None    # masks.Mask of a UNet contribution: always hooked
    spatial: bool = True   # its layer's output is over image positions (else regions masks it one level up)

    @property
    def signature(self):
        return (self.source, self.name, self.weight)


@dataclass
class _Merged:
    bound: object
    original: torch.Tensor          # W0, on the CPU
    signature: tuple = ()


@dataclass
class _Hooked:
    handle: object
    contributions: list


class _ModelState:
    def __init__(self):
        self.merged: dict = {}      # (id(layer), param name) -> _Merged
        self.hooked: dict = {}      # id(layer) -> _Hooked
        self.text_encoder = ()      # what the text encoder's layers are asked to compute
        self.blends: dict = {}      # id(anchor) -> regions.Blend: masks of layers without image positions
        self.suppressed: set = set()    # ids of contributions the hooks leave out (while a Blend re-runs)
        self.latent = None          # (h, w) of the latent the UNet was last called with (masks need it)
        self.latent_hook = None


class Engine:
    def __init__(self, cache: LoraCache | None = None, mode: str = MERGE):
        self.cache = cache or LoraCache()
        self.mode = mode
        self._states: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        # counts every change to what a text encoder computes (apply, restore, bake, forget): a host that
        # caches prompt conditioning compares it with the count it last saw (the webui keys its cache on
        # the prompt and its own networks, not on ours)
        self.text_encoder_edits = 0

    # --- public -------------------------------------------------------------------------------------------

    def apply(self, host, requests, mode: str | None = None, at: float | None = None) -> Report:
        """Makes the model compute what `requests` ask for at fraction `at` of the sampling steps (None:
        before sampling); a call that changes nothing writes nothing."""
        started = time.perf_counter()
        mode = mode or self.mode
        report = Report()
        wanted = self._plan(host, requests, report, at)
        state = self._states.setdefault(host.model, _ModelState())
        merge_wanted, hook_wanted = {}, {}
        for key, (bound, contributions) in wanted.items():
            # an nn.MultiheadAttention computes with its in_proj and out_proj weights directly, calling no
            # submodule: no hook could see those layers, so they are merged
            bypassable = bound.target.qkv is None and bound.owner is None
            hooked = [c for c in contributions if bypassable and (mode == BYPASS or c.mask is not None)]
            merged = [c for c in contributions if not any(c is h for h in hooked)]
            if merged:
                merge_wanted[key] = (bound, merged)
            if hooked:
                hook_wanted[key] = (bound, hooked)
        if mode == BYPASS and any(not (b.target.qkv is None and b.owner is None) for b, _ in wanted.values()):
            report.warnings.append("MultiheadAttention weights (open_clip text encoder) cannot be hooked; they were merged")
        if host.patcher is not None:        # the host merges through its own patch system (Forge)
            host.patcher.stage(merge_wanted)
            report.written = len(merge_wanted)
        else:
            self._sync_merged(host, state, merge_wanted, report)
        self._sync_hooks(host, state, hook_wanted)
        text_encoder = tuple(sorted((key, tuple(c.signature for c in contributions))
                                    for key, (bound, contributions) in wanted.items() if not bound.target.is_unet))
        if text_encoder != state.text_encoder:
            self.text_encoder_edits += 1
            state.text_encoder = text_encoder
        for item in report.applied:
            item["mode"] = mode
        report.seconds = time.perf_counter() - started
        return report

    def restore(self, host) -> Report:
        """Gives every weight of the host's model its original back and removes our hooks."""
        return self.apply(host, [])

    def forget(self, model) -> None:
        """The model's weights were replaced (a checkpoint was loaded into it): drop our copies without
        writing them back, and remove our hooks."""
        state = self._states.pop(model, None)
        self.text_encoder_edits += 1        # its weights, the text encoder's too, are not what they were
        if state is not None:
            for hooked in [*state.hooked.values(), *state.blends.values()]:
                hooked.handle.remove()
            if state.latent_hook is not None:
                state.latent_hook.remove()

    def active(self, model) -> bool:
        state = self._states.get(model)
        return bool(state and (state.merged or state.hooked or state.blends))

    # --- planning -----------------------------------------------------------------------------------------

    def _plan(self, host, requests, report, at=None) -> dict:
        """{(layer id, param name): (bound, [contributions])} of what the model should compute at `at`."""
        targets = host.applied_targets()
        wanted: dict = {}
        for req in requests:
            name = req.name or req.path
            if req.unet == 0 and req.te == 0:
                continue
            try:
                lora, stamp = self.cache.get(req.path, host.arch)
            except files.LoraFileError as e:
                report.warnings.append(f"{name}: skipped: {e.problem}")
                continue
            missing = [n for n in lora.modules if n not in targets]
            misfit = [n for n in lora.modules if n in targets and not _fits(lora.modules[n], targets[n])]
            if misfit or len(missing) * 2 > len(lora.modules):
                why = (f"{len(misfit)} layers have other sizes than the model's (e.g. {misfit[0]})" if misfit
                       else f"{len(missing)} of its {len(lora.modules)} layers are not in the model")
                report.warnings.append(f"{name}: skipped: it does not fit the loaded model: {why}")
                continue
            if missing:
                report.warnings.append(f"{name}: {len(missing)} layers not in the model were left out")
            used = 0
            for module_name, module in lora.modules.items():
                bound = targets.get(module_name)
                weight = req.weight_of(bound.target) if bound is not None else 0
                if bound is not None and bound.target.is_unet and not req.active_at(at):
                    weight = 0          # outside its steps
                if weight == 0:         # a block at 0 leaves its layers as they are
                    continue
                mask = req.mask if bound.target.is_unet else None
                # full/diff and norm modules change the layer's bias too: a key (and a contribution) of its own
                for held in (bound, bound.bias()) if module.changes_bias else (bound,):
                    wanted.setdefault((id(held.module), held.param_name), (held, []))[1].append(_Contribution(
                        (req.path, stamp), module_name, module, float(weight), held.rows, held.part, mask,
                        regions.spatial(bound.target)))
                used += 1
            report.applied.append({"name": name, "modules": used})
        return wanted

    # --- merge mode ---------------------------------------------------------------------------------------

    def _sync_merged(self, host, state, wanted, report) -> None:
        for key in [k for k in state.merged if k not in wanted]:
            entry = state.merged.pop(key)
            self._write(host, entry, [])
            report.restored += 1
        for key, (bound, contributions) in wanted.items():
            signature = tuple(c.signature for c in contributions)
            entry = state.merged.get(key)
            if entry is not None and entry.signature == signature:
                continue
            if entry is None:
                # the weight before any network: the built-in's backup when it holds one, else the live weight
                pristine = host.pristine_weight(bound)
                source = pristine if pristine is not None else bound.param
                entry = state.merged[key] = _Merged(bound, source.detach().to("cpu", copy=True))
            self._write(host, entry, contributions)
            entry.signature = signature
            report.written += 1

    @staticmethod
    @torch.no_grad()
    def _write(host, entry: _Merged, contributions) -> None:
        param = entry.bound.param
        original = entry.original.to(param.device, non_blocking=True)
        if not contributions:
            param.copy_(original)
        elif _fast_path(param, contributions):
            # fp32, plain LoRAs over the whole weight: W = W0 + sum w*s*up@down in place, no temporaries
            out = param.view(param.shape[0], -1)
            for i, c in enumerate(contributions):
                up, down = (t.to(param.device, torch.float32) for t in c.module.low_rank())
                up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
                if i == 0:
                    torch.addmm(original.view(param.shape[0], -1), up, down, alpha=c.weight * c.module.scale, out=out)
                else:
                    out.addmm_(up, down, alpha=c.weight * c.module.scale)
        else:
            # other dtypes and network types: the deltas in fp32, all formed before the weight is touched (a
            # module that turns out bad leaves it as it was), added, then cast once; an fp32 weight takes them
            # in place (two passes over the weight fewer than through a copy)
            deltas = []
            for c in contributions:
                # DoRA rescales W0 + delta, IA3 scales W0, OFT turns it, GLoRA maps it: W0 is the weight before
                # any network (the built-in's own rule is the weight before this network; the same for one on a layer)
                w0 = original[c.rows] if c.rows is not None else original
                deltas.append(c.module.change(c.part, w0.shape, w0).to(param.device))
            wide = param.dtype == torch.float32
            acc = param.copy_(original) if wide else original.to(torch.float32, copy=True)
            for c, d in zip(contributions, deltas):
                (acc[c.rows] if c.rows is not None else acc).add_(d, alpha=c.weight)
            if not wide:
                param.copy_(acc)
        host.weight_written(entry.bound, param)

    # --- bypass mode --------------------------------------------------------------------------------------

    def _sync_hooks(self, host, state, wanted) -> None:
        by_layer = {}           # a layer's weight and bias contributions go to its one hook
        for bound, contributions in wanted.values():
            by_layer.setdefault(id(bound.module), (bound, []))[1].extend(contributions)
        for layer_id in [k for k in state.hooked if k not in by_layer]:
            state.hooked.pop(layer_id).handle.remove()
        for layer_id, (bound, contributions) in by_layer.items():
            hooked = state.hooked.get(layer_id)
            if hooked is None:
                hooked = _Hooked(None, [])
                hooked.handle = bound.module.register_forward_hook(_bypass_hook(hooked, state))
                state.hooked[layer_id] = hooked
            hooked.contributions[:] = contributions      # the hook reads this list: a weight change is free
        masked = [(bound.module, c) for bound, cs in by_layer.values() for c in cs if c.mask is not None]
        if masked or state.blends:
            regions.sync(state, host.unet, [(layer, c) for layer, c in masked if not c.spatial])
        if masked and state.latent_hook is None:
            def note_latent(unet, args, kwargs):
                x = args[0] if args else next(iter(kwargs.values()))
                state.latent = tuple(x.shape[-2:])
            state.latent_hook = host.unet.register_forward_pre_hook(note_latent, with_kwargs=True)
        elif not masked and state.latent_hook is not None:
            state.latent_hook.remove()
            state.latent_hook = None


def _fits(module, bound) -> bool:
    bias = bound.bias()
    return module.fits(bound.shape) and module.fits_bias(bias.shape if bias is not None else None)


def _fast_path(param, contributions) -> bool:
    return param.dtype == torch.float32 and all(
        c.rows is None and c.part == "weight" and c.module.low_rank() is not None for c in contributions)


def _bypass_hook(hooked: _Hooked, state: _ModelState):
    def hook(layer, args, output):
        for c in hooked.contributions:
            if state.suppressed and id(c) in state.suppressed:
                continue
            change = _output_change(layer, args[0], c)
            if c.mask is not None and c.spatial:
                mask = c.mask.over(output, state.latent)
                if mask is None:        # not a grid of the latent: a mask cannot say where, so nowhere
                    continue
                change = change * mask
            output = output + change
        return output
    return hook


def _output_change(layer, x, c):
    """What contribution `c` adds to the layer's output on input `x`: the layer's own operation with the weight
    change (a low-rank pair through its two factors, never formed), or a bias change along its channels."""
    from torch.nn import functional as F

    from .networks import functional as fn

    conv = isinstance(layer, torch.nn.Conv2d)
    if c.part == "bias":
        d = c.module.change("bias", layer.bias.shape).to(x.device, x.dtype) * c.weight
        per_channel = conv or isinstance(layer, torch.nn.GroupNorm)        # channels on axis 1, else last
        return d.reshape(1, -1, *[1] * (x.ndim - 2)) if per_channel else d
    kw = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation) if conv else None
    pair = c.module.low_rank()
    if pair is not None:
        up, down = (t.to(x.device, x.dtype) for t in pair)
        return fn.lora_forward_delta(x, up, down, c.module.scale * c.weight, kw)
    delta = c.module.delta(layer.weight.shape, layer.weight).to(x.device, x.dtype) * c.weight
    if isinstance(layer, torch.nn.LayerNorm):
        return F.layer_norm(x, layer.normalized_shape, delta, None, layer.eps)     # normalised x times the change
    if isinstance(layer, torch.nn.GroupNorm):
        return F.group_norm(x, layer.num_groups, delta, None, layer.eps)
    return F.conv2d(x, delta, **kw) if conv else F.linear(x, delta)
