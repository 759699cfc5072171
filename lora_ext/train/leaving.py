"""What a run's steps need not keep in memory: the text encoders once every caption's output is cached (they
not trained), the VAE once every latent is, and, where the model is the process's own (host.disposable: a
headless run), the VAE's decoding half, which only previews use; such a run's UNet is read from its file only
once the text encoders are gone. A part leaves the device ('offloaded': to the CPU, put back after the run)
or, in a disposable host, is 'freed': nothing else will use it, and on a CPU leaving the device frees
nothing."""
from __future__ import annotations

import torch
from torch import nn

from .dataset_config import widest


def previews(cfg) -> bool:
    """Whether the run draws sample previews (they need the text encoders and the decoder)."""
    return bool(cfg.sample_prompts and (cfg.sample_every_n_steps or cfg.sample_every_n_epochs or cfg.sample_at_first))


def _leaving(host, cfg, device) -> str | None:
    """How a part the steps no longer need leaves: 'freed' in a disposable host that draws no previews,
    'offloaded' from a GPU otherwise; else None (on a CPU leaving the device frees nothing)."""
    if host.disposable and not previews(cfg):
        return "freed"
    return "offloaded" if device.type != "cpu" else None


def encoders_leave(host, cfg, train_te: bool, device) -> str | None:
    """How the text encoders leave before the first step, their outputs cached and they not trained
    (_leaving); else None."""
    if not (cfg.cache_text_encoder_outputs or cfg.cache_text_encoder_outputs_to_disk) or train_te:
        return None
    return _leaving(host, cfg, device)


def unet_after_encoders(cfg, device, spec) -> bool:   # spec: network_args.NetworkSpec
    """Whether a headless run reads its UNet's weights only after its text encoders are freed (their outputs
    cached, they not trained, no previews: encoders_leave 'freed'), so that the two never share the memory:
    on a CPU (memory allocated there is not the process's until written; a GPU's is), and not for DoRA, whose
    modules start from the layer's weight, nor with base_weights, merged into the weights before the run."""
    cached = (cfg.cache_text_encoder_outputs or cfg.cache_text_encoder_outputs_to_disk) and not cfg.base_weights
    frozen = all(lr == 0 for part, lr in spec.lrs.items() if part != "unet")
    return bool(cached and frozen and not previews(cfg) and device.type == "cpu" and not spec.options.dora)


def vae_leaves(host, cfg, device) -> str | None:
    """How the VAE leaves once every latent the run needs is cached (_leaving); never under flip_aug: a
    flipped image may still be asked for."""
    if not cfg.cache_latents or widest(cfg).flip_aug:
        return None
    return _leaving(host, cfg, device)


def decoder_parts(host, cfg) -> list:
    """The VAE's decoder and post-quant convolution, freed before the first step of a disposable host's run
    that draws no previews (SD's decoder holds 60 % of the VAE's weights: 0.2 GB in fp32); else none.
    Every VAE layout we host (ldm's, sgm's, diffusers') names them so."""
    if not host.disposable or previews(cfg):
        return []
    parts = (getattr(host.vae, name, None) for name in ("decoder", "post_quant_conv"))
    return [m for m in parts if isinstance(m, nn.Module)]


def free(module) -> None:
    """The module's weights released, on whatever device they are."""
    for t in list(module.parameters()) + list(module.buffers()):
        t.data = torch.empty(0, dtype=t.dtype, device=t.device)


def freed(module) -> bool:
    return all(p.numel() == 0 for p in module.parameters())
