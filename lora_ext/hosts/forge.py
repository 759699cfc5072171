"""The host adapter over Stable Diffusion WebUI Forge's loaded model (`modules.shared.sd_model`, one of
Forge's diffusion engines). Forge holds its UNet, text encoders and VAE in "patchers" that merge weight
patches into the layers when it next loads the model; a weight we wrote into a layer ourselves would be
undone by that merge, or would spoil the copy Forge restores from (on the CPU it holds the very same tensor).
So on Forge the panel's merged LoRAs go through Forge's own patch API (ForgePatches, below): one patch set per
part, its identifier a digest of everything in it, so Forge merges again exactly when something changed,
after its built-in `<lora:>` patches, and gives its weights back when ours are gone.

Module paths: the UNet keeps the ldm names (`diffusion_model.input_blocks.1.1...`); the text encoders are
transformers' CLIPTextModel under `clip_l` / `clip_h` / `clip_g` (SD1 / SD2 / SDXL), so kohya names bind
through their diffusers paths. The layers are Forge's own (its Linear is not an nn.Linear), which the
bypass and mask hooks take as they are."""
from __future__ import annotations

import contextlib
import functools
import hashlib
from functools import cached_property

import torch
from torch import nn

from .. import naming
from . import UnsupportedModel, text_encoding
from .base import ConditioningMixin, LdmLayoutMixin, bind

PATCH_TYPE = "lora_ext"         # our patch type in Forge's table of weight calculators
_PREFIX = "lora_ext:"           # what our patch sets' identifiers start with
# the text encoder each diffusers component is in Forge's JointTextEncoder, per family
_ENCODERS = {"sd1": {"text_encoder": "clip_l"}, "sd2": {"text_encoder": "clip_h"},
             "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}}


class _Parts(nn.Module):
    """Forge's UNet model, joint text encoder and VAE under one root (the host's `model`), so that targets bind
    and training walks the layers as on other hosts: `unet.<its parameter names>`, `clip.<...>` (the patch keys
    are the names after the root), `vae.<...>`."""

    def __init__(self, unet: nn.Module, clip: nn.Module, vae: nn.Module):
        super().__init__()
        self.unet, self.clip, self.vae = unet, clip, vae


class ForgeHost(LdmLayoutMixin, ConditioningMixin):
    def __init__(self, engine):
        self.engine = engine        # Forge's diffusion engine (modules.shared.sd_model there)
        objects = engine.forge_objects_original
        self.model = _Parts(objects.unet.model, objects.clip.cond_stage_model, objects.vae.first_stage_model)
        self.patcher = ForgePatches(self)

    @staticmethod
    def accepts(model) -> bool:
        """One of Forge's diffusion engines: its parts in `forge_objects`."""
        return getattr(model, "forge_objects", None) is not None

    @cached_property
    def arch(self) -> naming.Arch:
        engine = self.engine
        name = next((n for n, flag in (("sdxl", "is_sdxl"), ("sd2", "is_sd2"), ("sd1", "is_sd1"))
                     if getattr(engine, flag, False)), None)
        if name is None:
            raise UnsupportedModel(f"the loaded Forge model ({type(engine).__name__}) is not Stable Diffusion 1, 2 "
                                   "or SDXL; lora_ext works on those")
        clip = self._objects.clip.cond_stage_model
        tes = tuple(naming.TextEncoderShape("hf", getattr(clip, encoder).transformer.config.num_hidden_layers)
                    for encoder in _ENCODERS[name].values())
        shapes = {"model." + k: tuple(p.shape) for k, p in self._objects.unet.model.named_parameters()}
        return naming.arch_of_unet(shapes, name, tes)

    @property
    def _objects(self):
        # the original objects: the ones a generation starts from; their modules are the live ones
        return self.engine.forge_objects_original

    def _path(self, target: naming.Target) -> str:
        if target.is_unet:
            return "unet." + target.webui.removeprefix("model.")
        component, _, rest = target.diffusers.partition(".")
        return f"clip.{_ENCODERS[self.arch.name][component]}.transformer.{rest}"

    @cached_property
    def _bound(self) -> dict:
        return bind(self.model, naming.targets(self.arch), self._path)

    def lora_targets(self) -> dict:
        return self._bound

    @cached_property
    def _applied(self) -> dict:
        return {**self._bound, **bind(self.model, naming.extra_targets(self.arch), self._path)}

    def applied_targets(self) -> dict:
        return self._applied

    def patch_key(self, bound) -> tuple:
        """(part, parameter name in that part's patcher) of a bound target: ('unet' | 'clip', key)."""
        part, _, path = self._path(bound.target).partition(".")
        return part, f"{path}.{bound.param_name}"

    @property
    def unet(self):
        return self.model.unet.diffusion_model

    @property
    def vae(self):
        return self.model.vae

    def text_encoders(self) -> list:
        clip = self._objects.clip.cond_stage_model
        return [getattr(clip, encoder) for encoder in _ENCODERS[self.arch.name].values()]

    @property
    def latent_scale(self) -> float:
        return float(getattr(self.vae, "scaling_factor", 0.18215))

    @property
    def prediction(self) -> str:
        return "v" if self._objects.unet.model.predictor.prediction_type == "v_prediction" else "eps"

    @property
    def alphas_cumprod(self):
        """The noise schedule, from the sigmas Forge's sampler uses (sigma^2 = (1 - a) / a)."""
        sigmas = self._objects.unet.model.predictor.sigmas.float()
        return 1.0 / (sigmas * sigmas + 1.0)

    @property
    def pooled_width(self) -> int | None:
        return None if self.arch.name != "sdxl" else self.text_encoders()[-1].transformer.config.projection_dim

    # --- what applying needs of the weights: Forge's patches carry ours, we write none -------------------

    def pristine_weight(self, bound):
        return None

    def weight_written(self, bound, weight) -> None:
        return None

    # --- what training computes, with Forge's own encoders and UNet --------------------------------------

    def training_patches(self) -> list:
        """Forge's transformer blocks add their attention and MLP outputs to the residual in place (`x += n`),
        after the norms saved that residual for the backward pass: each norm is given a copy of its input for
        the run, so the in-place add changes nothing autograd kept (what the norms save is unchanged in size)."""
        copies = [(norm, functools.partial(_on_a_copy, norm)) for block in self.unet.modules()
                  if type(block).__name__ == "BasicTransformerBlock"
                  for norm in (getattr(block, n, None) for n in ("norm1", "norm2", "norm3")) if norm is not None]
        return super().training_patches() + copies

    def _holders(self) -> list:
        clip = self._objects.clip
        return [text_encoding.Holder(getattr(clip.cond_stage_model, name).transformer, getattr(clip.tokenizer, name),
                                     zero_pad=name == "clip_g")
                for name in _ENCODERS[self.arch.name].values()]

    def count_tokens(self, text: str) -> int:
        return len(text_encoding.tokenize(self._holders()[0], [text])[0])

    def encode_text(self, prompts: list, clip_skip: int = 1, max_tokens: int = 75):
        """As the webui encodes a prompt (75-token chunks, clip_skip), through Forge's text encoder modules."""
        return text_encoding.encode(self._holders(), prompts, clip_skip, max_tokens, self.arch.name == "sdxl")

    @contextlib.contextmanager
    def training_weights(self):
        """For the length of a run: the checkpoint's own weights (Forge gives back what its patches changed;
        afterwards it merges again what its objects ask for, the built-in's `<lora:>` of the last generation:
        the same bits as before), as tensors autograd can save (Forge loads weights under inference mode, and
        those cannot take part in a backward pass: each is replaced by an ordinary tensor of the same bits,
        one at a time; Forge computes with either)."""
        for patcher in (self._objects.unet, self._objects.clip.patcher):
            patcher.refresh_loras()     # the original objects carry no patches: Forge restores what it patched
        with torch.inference_mode(False), torch.no_grad():
            for module in self.model.modules():
                for store in (module._parameters, module._buffers):
                    for name, t in list(store.items()):
                        if t is not None and t.is_inference():
                            ordinary = t.clone()
                            store[name] = nn.Parameter(ordinary, requires_grad=False) if isinstance(
                                t, nn.Parameter) else ordinary
        try:
            yield
        finally:
            after = self.engine.forge_objects_after_applying_lora
            for patcher in (after.unet, after.clip.patcher):
                patcher.refresh_loras()


def _on_a_copy(module, x):
    return type(module).forward(module, x.clone())


def _digest(signature) -> str:
    return hashlib.sha256(repr(signature).encode()).hexdigest()[:16]


class ForgePatches:
    """The panel's merged LoRAs as Forge patches. The engine stages what each weight should hold (`stage`);
    the webui script installs the staged sets on Forge's current objects at the points Forge reads them
    (`install('clip')` before the conditioning is computed, `install('unet')` before sampling), and once the
    generation is over `release()` has Forge merge its weights again without ours."""

    def __init__(self, host: ForgeHost):
        self.host = host
        self.staged = {"unet": ("", {}), "clip": ("", {})}     # part -> (identifier digest, {key: patch})
        self.live = None        # the UNet patcher ours are installed on while it samples

    def stage(self, wanted: dict) -> None:
        """`wanted`: {key: (bound, [contributions])} of the weights to change (apply.Engine's plan)."""
        parts = {"unet": {}, "clip": {}}
        signature = {"unet": [], "clip": []}
        for bound, contributions in wanted.values():
            part, key = self.host.patch_key(bound)
            parts[part][key] = (PATCH_TYPE, tuple(contributions))
            signature[part].append((key, tuple((c.signature, c.rows, c.part) for c in contributions)))
        before = self.staged["unet"][0]
        self.staged = {part: (_digest(sorted(signature[part])), patches) for part, patches in parts.items()}
        if self.live is not None and self.staged["unet"][0] != before:
            # a step range switched a LoRA on or off while Forge samples: its UNet merges the new set now
            self._add(self.live)
            self.live.refresh_loras()

    def install(self, part: str, scheduled: bool = False) -> int:
        """Our staged patches added to a clone of Forge's current `part` ('unet' | 'clip'); the count of
        weights they change. `scheduled`: a LoRA switches on or off during sampling, so the UNet gets its
        clone (to change while it samples) even with nothing on it yet."""
        digest, patches = self.staged[part]
        if not patches and not (scheduled and part == "unet"):
            return 0
        objects = self.host.engine.forge_objects
        clone = getattr(objects, part).clone()
        self._add(clone.patcher if part == "clip" else clone, part)
        setattr(objects, part, clone)
        if part == "unet":
            self.live = clone
        return len(patches)

    def _add(self, patcher, part: str = "unet") -> None:
        """Our staged set for `part` on `patcher`, in place of any set of ours it had."""
        _register_patch_type()
        for identifier in [i for i in patcher.lora_patches if str(i[0]).startswith(_PREFIX)]:
            del patcher.lora_patches[identifier]
        digest, patches = self.staged[part]
        if patches:
            patcher.add_patches(filename=_PREFIX + digest, patches=patches, strength_patch=1.0)

    def release(self) -> None:
        """Forge merged ours into its weights when it loaded the model: have it merge them again with only
        what its own objects ask for (the built-in's `<lora:>`), so the model is as the built-in left it."""
        self.live = None
        after = self.host.engine.forge_objects_after_applying_lora
        for patcher in (after.unet, after.clip.patcher):
            if _PREFIX in str(patcher.lora_loader.loaded_hash):
                patcher.refresh_loras()


def _register_patch_type() -> None:
    from backend.patcher import lora as forge_lora      # Forge's own module: only ever reached inside Forge

    forge_lora.extra_weight_calculators.setdefault(PATCH_TYPE, calculate)


def calculate(weight, strength: float, contributions):
    """Forge's call for one weight (fp32, Forge's copy): every contribution's change, formed from the weight as
    Forge hands it (after the built-in's patches), then added at its weight times Forge's strength."""
    deltas = []
    for c in contributions:
        w0 = weight[c.rows] if c.rows is not None else weight
        deltas.append(c.module.change(c.part, w0.shape, w0).to(weight.device, weight.dtype))
    for c, d in zip(contributions, deltas):
        (weight[c.rows] if c.rows is not None else weight).add_(d, alpha=c.weight * strength)
    return weight
