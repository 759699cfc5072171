"""A model shaped as Forge's loaded model is (../shared/forge/NOTES.md), built from a tiny webui-layout model's
own modules: `forge_objects` (and its `_original` / `_after_applying_lora` copies) with a `unet` whose
`.model.diffusion_model` is the ldm UNet, a `clip` whose `.cond_stage_model.clip_l` (SD1) holds a transformers
CLIPTextModel as `.transformer`, and a `vae`. Patchers record what is added to them. Only for the fast tier's
checks of binding and patch keys; the real-Forge tier holds the adapter against Forge itself."""
from __future__ import annotations

from torch import nn


class Patcher:
    def __init__(self, model, patches=None):
        self.model, self.lora_patches = model, dict(patches or {})

    def clone(self):
        return Patcher(self.model, self.lora_patches)

    def add_patches(self, *, filename, patches, strength_patch=1.0):
        self.lora_patches[(filename, strength_patch, 1.0, False)] = patches
        return set(patches)

    def refresh_loras(self):
        self.refreshed = getattr(self, "refreshed", 0) + 1


class Clip(Patcher):
    def __init__(self, model, tokenizer, patches=None):
        super().__init__(model, patches)
        self.cond_stage_model, self.tokenizer, self.patcher = model, tokenizer, self

    def clone(self):
        return Clip(self.model, self.tokenizer, self.lora_patches)


class Objects:
    def __init__(self, unet, clip, vae):
        self.unet, self.clip, self.vae = unet, clip, vae

    def shallow_copy(self):
        return Objects(self.unet, self.clip, self.vae)


class _KModel(nn.Module):
    def __init__(self, unet, alphas_cumprod):
        super().__init__()
        self.diffusion_model = unet
        # Forge's k-diffusion predictor: the schedule as sigmas
        self.predictor = type("Prediction", (), {"prediction_type": "epsilon",
                                                 "sigmas": ((1 - alphas_cumprod) / alphas_cumprod).sqrt()})()


class ForgeShaped:
    is_sd1 = True
    current_lora_hash = "[]"

    def __init__(self, tiny):
        holder = tiny.text_holders()[0]
        clip = Clip(nn.ModuleDict({"clip_l": holder}), type("Tokenizers", (), {"clip_l": holder.tokenizer})())
        vae = type("VAE", (), {"first_stage_model": tiny.first_stage_model})()
        self.forge_objects = Objects(Patcher(_KModel(tiny.model.diffusion_model, tiny.alphas_cumprod)), clip, vae)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
