"""The host contract: everything training, applying, merging and the memory estimate may ask of a host
adapter. WebuiHost (the webui's loaded model, or anything in its layout: headless checkpoints, the tiny test
models) and DiffusersHost (a diffusers folder) fulfil it; a new host (Forge) is one more file that does.
The engines never ask which host they run on, and build none: `hosts.for_model` picks the adapter
(tests/test_hosts.py holds every adapter against this Protocol, members and signatures)."""
from __future__ import annotations

from typing import ContextManager, Protocol, runtime_checkable

import torch
from torch import nn

from .. import naming
from .base import Bound
from .conditioning import Cond, Size, Text


@runtime_checkable
class Host(Protocol):
    model: nn.Module                # the root every trained or patched layer lives under
    disposable: bool                # the process owns the model (headless): a run may free parts of it
    vae_file: str                   # a VAE file the opener loaded into the model (kohya's --vae), or ""
    pending: object | None          # weights not read from the file yet (.read() reads them), or None
    patcher: object | None          # None: merged LoRAs are written into the weights; else the host's patch
                                    # system takes them (.stage(plan); Forge: hosts.forge.ForgePatches)

    # --- what the model is ------------------------------------------------------------------------------
    @property
    def arch(self) -> naming.Arch: ...                  # 'sd1' | 'sd2' | 'sdxl' and the layout's shapes
    @property
    def prediction(self) -> str: ...                    # 'eps' | 'v'
    @property
    def alphas_cumprod(self) -> torch.Tensor: ...       # the training noise schedule
    @property
    def unet(self) -> nn.Module: ...
    @property
    def vae(self) -> nn.Module: ...
    @property
    def latent_scale(self) -> float: ...
    @property
    def pooled_width(self) -> int | None: ...           # SDXL: the pooled text width; None otherwise

    # --- layers LoRAs go on (apply, merge, train) ---------------------------------------------------------
    def lora_targets(self) -> dict[str, Bound]: ...     # {kohya name: the live layer} that training targets
    def applied_targets(self) -> dict[str, Bound]: ...  # those and naming.extra_targets (norms, conv_in ...)
    def text_encoders(self) -> list[nn.Module]: ...     # to move off the device once their outputs are cached
    def checkpoint_blocks(self) -> list[nn.Module]: ...  # what gradient checkpointing wraps
    def training_patches(self) -> list: ...             # (module, forward) pairs a run installs (fused attention)
    def estimate_attention_patches(self) -> list: ...   # (module, forward) pairs: its shapes, for the estimate
    def pristine_weight(self, bound: Bound) -> torch.Tensor | None: ...  # before any network (another's backup)
    def weight_written(self, bound: Bound, weight: torch.Tensor) -> None: ...  # we changed it: tell the others
    def training_weights(self) -> ContextManager: ...   # the checkpoint's own weights for the length of a run

    # --- what training and sampling compute ---------------------------------------------------------------
    def count_tokens(self, text: str) -> int: ...
    def encode_text(self, prompts: list[str], clip_skip: int = 1, max_tokens: int = 75) -> Text: ...
    def condition(self, text: Text, sizes: list[Size] | None = None) -> Cond: ...   # SDXL: per-image sizes
    def encode_prompts(self, prompts: list, clip_skip: int = 1, max_tokens: int = 75,
                       sizes: list | None = None) -> Cond: ...      # encode_text, then condition
    def encode_images(self, pixels: torch.Tensor, seeds=None) -> torch.Tensor: ...  # scaled latents
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor: ...
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor: ...
