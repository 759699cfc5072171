"""What every host adapter hands the engines: its targets bound to the live layers."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .. import naming


@dataclass(frozen=True)
class Bound:
    """A LoRA target bound to the layer that holds its weight. For an open_clip q/k/v target the layer is the
    nn.MultiheadAttention and the weight a row block of its in_proj_weight; for an out_proj inside one,
    `owner` is that MultiheadAttention (it computes with out_proj's weight directly). `part` 'bias' binds the
    layer's bias instead (full/diff and norm modules change it too)."""
    target: naming.Target
    module: nn.Module
    owner: nn.Module | None = None
    part: str = "weight"

    @property
    def param_name(self) -> str:
        prefix = "in_proj_" if self.target.qkv is not None else ""
        return prefix + self.part

    def bias(self) -> "Bound | None":
        """The same target's bias, or None where the layer has none."""
        bound = replace(self, part="bias")
        return bound if getattr(self.module, bound.param_name, None) is not None else None

    @property
    def param(self):
        return getattr(self.module, self.param_name)

    @property
    def rows(self) -> slice | None:
        if self.target.qkv is None:
            return None
        n = self.param.shape[0] // 3
        return slice(self.target.qkv * n, (self.target.qkv + 1) * n)

    @property
    def weight(self):
        """This target's weight (for q/k/v: its row block, a view)."""
        return self.param[self.rows] if self.rows is not None else self.param

    @property
    def shape(self) -> tuple:
        """Shape of this target's weight or bias (for q/k/v: its row block)."""
        shape = tuple(self.param.shape)
        return (shape[0] // 3,) + shape[1:] if self.target.qkv is not None else shape


def input_placement(module: nn.Module) -> tuple:
    """(device, dtype) of what `module` computes on: its widest floating dtype, so that a model cast whole
    takes its own and one whose frozen weights are stored narrower than its norms takes the norms' (those
    weights are cast up at use: train.upcast; or autocast casts them)."""
    floating = [p for p in module.parameters() if p.is_floating_point()]
    return floating[0].device, max((p.dtype for p in floating), key=lambda d: d.itemsize)


def sample_latents(mean, std, seeds, scale: float):
    """Latents from a VAE's distribution: one sample per image, drawn with that image's seed (the mean
    without seeds), times the latent scale."""
    if seeds is None:
        return mean * scale
    noise = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return (mean + std * noise.to(mean.device, mean.dtype)) * scale


def bind(root: nn.Module, targets, path_of=lambda t: t.webui) -> dict:
    """{kohya name: Bound} for the targets that exist under `root`; `path_of(target)` is the module path
    relative to it (the webui path by default; diffusers hosts give the diffusers path)."""
    bound = {}
    for t in targets:
        path = path_of(t)
        try:
            module = root.get_submodule(path)
        except AttributeError:
            continue
        owner = None
        if path.endswith(".out_proj"):
            parent = root.get_submodule(path.rsplit(".", 1)[0])
            owner = parent if isinstance(parent, nn.MultiheadAttention) else None
        bound[t.kohya] = Bound(t, module, owner)
    return bound


class ConditioningMixin:
    """What every host computes the same way from its own encode_text and UNet: the conditioning of texts and
    sizes, prompts straight to conditioning, and fused attention while training."""

    # True where the process owns the model (a headless run): a run may free the parts it no longer needs,
    # since nothing of it is put back; the webui's loaded model is never so
    disposable = False
    vae_file = ""
    # merged LoRAs are written into the live weights (apply.Engine keeps the originals); a host whose
    # framework merges weights itself hands them to its patch system instead (hosts.forge)
    patcher = None

    @property
    def pending(self):
        """Weights the model's loader has not read yet (hosts.checkpoint.Pending: a headless run's UNet, read
        once its text encoders are freed, train.leaving.unet_after_encoders), or None."""
        pending = getattr(self.model, "pending", None)
        return None if pending is None or pending.done else pending

    def condition(self, text, sizes: list | None = None):
        from .conditioning import condition
        return condition(text, sizes)

    def encode_prompts(self, prompts: list, clip_skip: int = 1, max_tokens: int = 75, sizes: list | None = None):
        return self.condition(self.encode_text(prompts, clip_skip, max_tokens), sizes)

    def training_patches(self) -> list:
        """(module, forward) pairs a run installs for its length: ldm's attention through torch's fused kernel."""
        from .ldm_attention import sdpa_patches
        return sdpa_patches(self.unet)

    def estimate_attention_patches(self) -> list:
        """(module, forward) pairs for the memory estimate's meta forward: what a fused attention kernel keeps
        for backward, whatever forward the host installed."""
        from .ldm_attention import fused_attention_shape_patches
        return fused_attention_shape_patches(self.unet)


class LdmLayoutMixin:
    """What hosts whose UNet is in ldm's layout (input_blocks, middle_block, output_blocks; SDXL's label_emb)
    and whose VAE has ldm's encoder / quant_conv / decode compute the same way: the webui's model and Forge's."""

    def checkpoint_blocks(self) -> list:
        """The UNet blocks our gradient checkpointing wraps."""
        unet = self.unet
        return list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks)

    def _size_dim(self, pooled_width: int) -> int:
        return (self.unet.label_emb[0][0].in_features - pooled_width) // 6

    def encode_images(self, pixels, seeds=None):
        """Latents (scaled) of images in [-1, 1]: a sample of the VAE's distribution per image, drawn with
        that image's seed (the distribution's mean without seeds)."""
        vae = self.vae
        p = next(vae.parameters())
        # the posterior's moments from the encoder itself: ldm's encode() returns the distribution, but sgm's
        # inference wrapper (the webui's SDXL VAE) a sample of it, drawn from the global RNG
        moments = vae.encoder(pixels.to(p.device, p.dtype))
        if getattr(vae, "quant_conv", None) is not None:        # Forge's VAE may have none
            moments = vae.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))      # as ldm's and sgm's DiagonalGaussianDistribution
        return sample_latents(mean, std, seeds, self.latent_scale)

    def decode_latents(self, latents):
        p = next(self.vae.parameters())
        return self.vae.decode((latents / self.latent_scale).to(p.device, p.dtype))

    def predict(self, noisy, timesteps, cond):
        device, dtype = input_placement(self.unet)
        c = cond.to(device, dtype)
        # the pooled width from the conditioning itself: the text encoders may be freed by now (train.leaving)
        extra = {} if c.pooled is None else {"y": c.vector(self._size_dim(c.pooled.shape[-1]))}
        return self.unet(noisy.to(device, dtype), timesteps.to(device), context=c.crossattn, **extra)
