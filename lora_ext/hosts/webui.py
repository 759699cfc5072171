"""The host adapter over the webui's loaded model (`modules.shared.sd_model`), or anything with its layout
(the tiny test models). It needs nothing from the webui's `modules` package: the model object is enough
(running a job inside the webui is lora_ext.glue's)."""
from __future__ import annotations

from functools import cached_property

import torch

from .. import naming
from . import builtin_lora, text_encoding
from .base import ConditioningMixin, bind, input_placement, sample_latents
from .conditioning import Cond, Text


class WebuiHost(ConditioningMixin):
    def __init__(self, sd_model):
        self.model = sd_model

    @staticmethod
    def accepts(model) -> bool:
        """A model in the webui's (ldm / sgm) layout: its UNet at .model.diffusion_model."""
        return hasattr(getattr(model, "model", None), "diffusion_model")

    @cached_property
    def arch(self) -> naming.Arch:
        return naming.arch_from_model(self.model)

    @property
    def prediction(self) -> str:
        return "v" if getattr(self.model, "parameterization", "eps") == "v" else "eps"

    @property
    def alphas_cumprod(self):
        return self.model.alphas_cumprod

    @cached_property
    def _bound(self) -> dict:
        return bind(self.model, naming.targets(self.arch))

    def lora_targets(self) -> dict:
        """{kohya name: Bound} for every target of the loaded model."""
        return self._bound

    @cached_property
    def _applied(self) -> dict:
        return {**self._bound, **bind(self.model, naming.extra_targets(self.arch))}

    def applied_targets(self) -> dict:
        """lora_targets and the layers files may change beyond them (naming.extra_targets)."""
        return self._applied

    # --- what training and sampling need ----------------------------------------------------------------

    @property
    def unet(self):
        return self.model.model.diffusion_model

    @property
    def vae(self):
        return self.model.first_stage_model

    def text_holders(self) -> list:
        m = self.model
        if getattr(m, "is_sdxl", False):      # the text embedders (the size embedders hold no `.wrapped`)
            return [e.wrapped for e in m.conditioner.embedders if hasattr(e, "wrapped")]
        return [m.cond_stage_model.wrapped]

    def text_encoders(self) -> list:
        """The text encoder modules (to move off the device once their outputs are cached)."""
        return self.text_holders()

    @property
    def latent_scale(self) -> float:
        return float(getattr(self.model, "scale_factor", 0.13025 if self.arch.name == "sdxl" else 0.18215))

    def checkpoint_blocks(self) -> list:
        """The UNet blocks gradient checkpointing wraps."""
        unet = self.unet
        return list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks)

    def count_tokens(self, text: str) -> int:
        return len(text_encoding.tokenize(self.text_holders()[0], [text])[0])

    def encode_text(self, prompts: list, clip_skip: int = 1, max_tokens: int = 75) -> Text:
        """Per-token states [batch, 77 * chunks, dim]: each prompt cut or padded to `max_tokens` (75, 150,
        225), split in 75-token chunks, each encoded with its own start/end tokens and the results joined, as
        the webui does at generation time. SDXL: both encoders side by side, and the pooled output."""
        return text_encoding.encode(self.text_holders(), prompts, clip_skip, max_tokens, self.arch.name == "sdxl")

    @property
    def pooled_width(self) -> int | None:
        """SDXL: the width of the second encoder's pooled, projected output (real: 1280)."""
        if not hasattr(self.unet, "label_emb"):
            return None
        return self.text_holders()[-1].model.text_projection.shape[1]

    @property
    def size_dim(self) -> int | None:
        """SDXL: channels per size number, what label_emb takes beyond the pooled text (real models: 256)."""
        return None if self.pooled_width is None else self._size_dim(self.pooled_width)

    def _size_dim(self, pooled_width: int) -> int:
        return (self.unet.label_emb[0][0].in_features - pooled_width) // 6

    def encode_images(self, pixels, seeds=None):
        """Latents (scaled) of images in [-1, 1]: a sample of the VAE's distribution per image, drawn with
        that image's seed (the distribution's mean without seeds)."""
        p = next(self.vae.parameters())
        # the posterior's moments from the encoder itself: ldm's encode() returns the distribution, but sgm's
        # inference wrapper (the webui's SDXL VAE) a sample of it, drawn from the global RNG
        moments = self.vae.quant_conv(self.vae.encoder(pixels.to(p.device, p.dtype)))
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))      # as ldm's and sgm's DiagonalGaussianDistribution
        return sample_latents(mean, std, seeds, self.latent_scale)

    def decode_latents(self, latents):
        p = next(self.vae.parameters())
        return self.vae.decode((latents / self.latent_scale).to(p.device, p.dtype))

    def predict(self, noisy, timesteps, cond: Cond):
        device, dtype = input_placement(self.unet)
        c = cond.to(device, dtype)
        # the pooled width from the conditioning itself: the text encoders may be freed by now (train.leaving)
        extra = {} if c.pooled is None else {"y": c.vector(self._size_dim(c.pooled.shape[-1]))}
        return self.unet(noisy.to(device, dtype), timesteps.to(device), context=c.crossattn, **extra)

    # --- living beside the webui's built-in Lora, and its faster attention -------------------------------

    def pristine_weight(self, bound):
        """The weight before any network (the built-in Lora's backup when it holds one), or None = the live one."""
        return builtin_lora.backup_of(bound)

    def weight_written(self, bound, weight) -> None:
        builtin_lora.hand_over(bound, weight)

    def training_weights(self):
        """While training, the model holds the checkpoint's own weights (the built-in's deltas set aside)."""
        return builtin_lora.checkpoint_weights(self.model)
