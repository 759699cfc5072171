"""The host adapter over a diffusers model folder (unet/, text_encoder/, tokenizer/, vae/, scheduler/), for
headless training. Targets are bound through their diffusers paths; the LoRA files are the same kohya files
as on the webui's model. SD1/SD2 (SDXL's extra conditioning is not built here)."""
from __future__ import annotations

import json
import os
from functools import cached_property

import torch
from torch import nn

from .. import naming
from . import text_encoding
from .base import bind, sample_latents


class DiffusersError(ValueError):
    pass


class _Holder:
    """What text_encoding expects of a transformers text encoder: `.transformer`, `.tokenizer`."""

    def __init__(self, transformer, tokenizer):
        self.transformer, self.tokenizer = transformer, tokenizer


class _Pipeline(nn.Module):
    def __init__(self, unet, text_encoder, vae):
        super().__init__()
        self.unet, self.text_encoder, self.vae = unet, text_encoder, vae


class DiffusersHost:
    def __init__(self, folder: str):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        missing = [d for d in ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
                   if not os.path.isdir(os.path.join(folder, d))]
        if missing:
            raise DiffusersError(f"{folder}: not a diffusers model folder (no {', '.join(missing)})")
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        if unet.config.addition_embed_type is not None:
            raise DiffusersError(f"{folder}: SDXL diffusers folders are not supported for training yet")
        self.model = _Pipeline(unet, CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
                               AutoencoderKL.from_pretrained(folder, subfolder="vae")).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
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
        name = "sd2" if c.cross_attention_dim == 1024 else "sd1"
        te = naming.TextEncoderShape("hf", self.model.text_encoder.config.num_hidden_layers)
        mid = depths[-1] if depths[-1] else max(depths)
        return naming.Arch(name, mult[:levels], depths, mid, bool(c.use_linear_projection), (te,), c.layers_per_block)

    @property
    def prediction(self) -> str:
        return "v" if self.scheduler.get("prediction_type") == "v_prediction" else "eps"

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        s = self.scheduler
        n, b0, b1 = s.get("num_train_timesteps", 1000), s.get("beta_start", 0.00085), s.get("beta_end", 0.012)
        if s.get("beta_schedule", "scaled_linear") == "scaled_linear":
            betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float64) ** 2
        else:
            betas = torch.linspace(b0, b1, n, dtype=torch.float64)
        return torch.cumprod(1 - betas, 0).float()

    @cached_property
    def _bound(self) -> dict:
        return bind(self.model, naming.targets(self.arch), path_of=lambda t: t.diffusers)

    def lora_targets(self) -> dict:
        return self._bound

    def checkpoint_blocks(self) -> list:
        return list(self.unet.down_blocks) + [self.unet.mid_block] + list(self.unet.up_blocks)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def encode_prompts(self, prompts: list, clip_skip: int = 1, max_tokens: int = 75):
        return text_encoding.encode([_Holder(self.model.text_encoder, self.tokenizer)], prompts, clip_skip, max_tokens)

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

    def predict(self, noisy, timesteps, cond):
        p = next(self.unet.parameters())
        return self.unet(noisy.to(p.device, p.dtype), timesteps.to(p.device), encoder_hidden_states=cond.to(p.device, p.dtype)).sample
