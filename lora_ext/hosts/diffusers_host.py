"""The host adapter over a diffusers model folder (unet/, text_encoder/, tokenizer/, vae/, scheduler/; SDXL
adds text_encoder_2/ and tokenizer_2/), for headless training. Targets are bound through their diffusers
paths; the LoRA files are the same kohya files as on the webui's model. SDXL's second encoder is
transformers' CLIPTextModelWithProjection here (its pooled output is `text_embeds`), and the UNet embeds the
size numbers itself (`added_cond_kwargs` text_embeds / time_ids)."""
from __future__ import annotations

import contextlib
import json
import os
from functools import cached_property

import torch
from torch import nn

from .. import naming
from . import text_encoding
from .base import ConditioningMixin, bind, input_placement, sample_latents
from .conditioning import Cond, Text
from .ldm_layout import v4_layout


class DiffusersError(ValueError):
    pass


class _Pipeline(nn.Module):
    def __init__(self, unet, text_encoder, vae, text_encoder_2=None):
        super().__init__()
        self.unet, self.text_encoder, self.vae = unet, text_encoder, vae
        if text_encoder_2 is not None:
            self.text_encoder_2 = text_encoder_2


class DiffusersHost(ConditioningMixin):
    def __init__(self, folder: str):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        missing = [d for d in ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
                   if not os.path.isdir(os.path.join(folder, d))]
        if missing:
            raise DiffusersError(f"{folder}: not a diffusers model folder (no {', '.join(missing)})")
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        sdxl = unet.config.addition_embed_type == "text_time"
        if unet.config.addition_embed_type is not None and not sdxl:
            raise DiffusersError(f"{folder}: a UNet with addition_embed_type {unet.config.addition_embed_type!r} "
                                 "is not Stable Diffusion 1/2 or SDXL")
        if sdxl and not all(os.path.isdir(os.path.join(folder, d)) for d in ("text_encoder_2", "tokenizer_2")):
            raise DiffusersError(f"{folder}: an SDXL UNet without text_encoder_2/ and tokenizer_2/")
        te2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2") if sdxl else None
        text_encoder = v4_layout(CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"))
        self.model = _Pipeline(unet, text_encoder,
                               AutoencoderKL.from_pretrained(folder, subfolder="vae"), te2).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.tokenizer_2 = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2") if sdxl else None
        with open(os.path.join(folder, "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
            self.scheduler = json.load(f)

    @property
    def unet(self):
        return self.model.unet

    @property
    def vae(self):
        return self.model.vae

    @cached_property
    def arch(self) -> naming.Arch:
        c = self.unet.config
        depth = c.transformer_layers_per_block
        levels = len(c.block_out_channels)
        depths = tuple((depth[i] if isinstance(depth, (list, tuple)) else depth) if "CrossAttn" in t else 0
                       for i, t in enumerate(c.down_block_types))
        mult = tuple(ch // c.block_out_channels[0] for ch in c.block_out_channels)
        tes = tuple(naming.TextEncoderShape("hf", m.config.num_hidden_layers) for m in self.text_encoders())
        name = "sdxl" if len(tes) == 2 else "sd2" if c.cross_attention_dim == 1024 else "sd1"
        mid = depths[-1] if depths[-1] else max(depths)
        return naming.Arch(name, mult[:levels], depths, mid, bool(c.use_linear_projection), tes, c.layers_per_block)

    @property
    def prediction(self) -> str:
        return "v" if self.scheduler.get("prediction_type") == "v_prediction" else "eps"

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        """The training schedule as diffusers' DDPMScheduler makes it from the folder's scheduler config (every
        beta_schedule it knows: linear, scaled_linear, squaredcos_cap_v2, trained_betas; kohya trains with it)."""
        import inspect

        from diffusers import DDPMScheduler

        defaults = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}     # SD's
        known = inspect.signature(DDPMScheduler.__init__).parameters     # the folder may name another class
        config = {**defaults, **{k: v for k, v in self.scheduler.items() if k in known}}
        return DDPMScheduler(**config).alphas_cumprod.float()

    @cached_property
    def _bound(self) -> dict:
        return bind(self.model, naming.targets(self.arch), path_of=lambda t: t.diffusers)

    def lora_targets(self) -> dict:
        return self._bound

    @cached_property
    def _applied(self) -> dict:
        return {**self._bound, **bind(self.model, naming.extra_targets(self.arch), path_of=lambda t: t.diffusers)}

    def applied_targets(self) -> dict:
        return self._applied

    def checkpoint_blocks(self) -> list:
        return list(self.unet.down_blocks) + [self.unet.mid_block] + list(self.unet.up_blocks)

    def text_encoders(self) -> list:
        second = getattr(self.model, "text_encoder_2", None)
        return [self.model.text_encoder] + ([second] if second is not None else [])

    def _holders(self) -> list:
        holders = [text_encoding.Holder(self.model.text_encoder, self.tokenizer)]
        if self.tokenizer_2 is not None:
            holders.append(text_encoding.Holder(self.model.text_encoder_2, self.tokenizer_2, zero_pad=True))
        return holders

    @property
    def pooled_width(self) -> int | None:
        return self.model.text_encoder_2.config.projection_dim if self.tokenizer_2 is not None else None

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def encode_text(self, prompts: list, clip_skip: int = 1, max_tokens: int = 75) -> Text:
        return text_encoding.encode(self._holders(), prompts, clip_skip, max_tokens, self.arch.name == "sdxl")

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    def encode_images(self, pixels, seeds=None):
        p = next(self.vae.parameters())
        dist = self.vae.encode(pixels.to(p.device, p.dtype)).latent_dist
        return sample_latents(dist.mean, dist.std, seeds, self.latent_scale)

    def decode_latents(self, latents):
        p = next(self.vae.parameters())
        return self.vae.decode((latents / self.latent_scale).to(p.device, p.dtype)).sample

    def predict(self, noisy, timesteps, cond: Cond):
        device, dtype = input_placement(self.unet)
        c = cond.to(device, dtype)
        extra = {} if c.pooled is None else {"added_cond_kwargs": {"text_embeds": c.pooled, "time_ids": c.sizes}}
        return self.unet(noisy.to(device, dtype), timesteps.to(device), encoder_hidden_states=c.crossattn,
                         **extra).sample

    # --- nothing else patches these layers ----------------------------------------------------------------

    def pristine_weight(self, bound):
        return None

    def weight_written(self, bound, weight) -> None:
        pass

    def training_weights(self):
        return contextlib.nullcontext()
