"""Tiny but real Stable Diffusion models in the webui's own module layout (lora_ext.hosts.ldm_layout).

No weights can be downloaded here, so tests and the demo build models from configs: the ldm UNet the webui
runs (package stable-diffusion-sdkit), transformers' CLIPTextModel (SD1, SDXL's first encoder) and
open_clip's text tower (SD2, SDXL's second encoder), and an ldm VAE. The shapes keep the real models'
structure (levels, which levels have attention, 2 res blocks per level) so that every module path of a tiny
model is also a path of the full-size one; only widths and depths shrink.

`build(arch)` returns a `TinySD` that looks to our code the way `modules.shared.sd_model` looks in the webui:
`.model.diffusion_model`, `.cond_stage_model.wrapped...` (SD1/SD2) or `.conditioner.embedders[i].wrapped`
(SDXL), `.first_stage_model`, `.alphas_cumprod`, `.parameterization`.
"""
from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass

import torch
from torch import nn

from .hosts.ldm_layout import (FULL_VAE_DDCONFIG, HFTextEncoderHolder, LdmVAE, OpenClipHolder, WebuiLayoutModel,
                                unet_from_config)


@dataclass(frozen=True)
class TinySpec:
    arch: str                       # 'sd1' | 'sd2' | 'sdxl'
    model_channels: int = 32
    channel_mult: tuple = (1, 2, 4, 4)
    depths: tuple = (1, 1, 1, 0)    # transformer depth per level, 0 = no attention at that level
    mid_depth: int = 1
    linear_proj: bool = False       # SD2/SDXL use Linear proj_in/proj_out
    te: tuple = (("hf", 32, 2),)    # (kind, width, layers) per text encoder
    parameterization: str = "eps"
    unet_heads: int = 2             # attention heads (SD1), or channels per head is 16 (SD2/SDXL tiny)
    te_heads: int = 2
    te_mlp: int = 2                 # text encoder MLP width / hidden width
    full_vae: bool = False          # the real SD VAE shape instead of a tiny one
    size_dim: int = 16              # SDXL: channels per size number in the label_emb vector (real: 256)
    head_channels: int = 16         # channels per attention head with Linear projections (real: 64)
    openclip_heads: int = 2         # heads of an open_clip text tower (real: width / 64)
    num_res_blocks: int = 2         # res blocks per UNet level (real: 2)


SPECS = {
    "sd1": TinySpec("sd1"),
    "sd2": TinySpec("sd2", linear_proj=True, te=(("openclip", 32, 3),), parameterization="v"),
    # SDXL: no attention on the first level and deeper transformers further down (real: 0, 2, 10; mid 10)
    "sdxl": TinySpec("sdxl", channel_mult=(1, 2, 4), depths=(0, 2, 3), mid_depth=3, linear_proj=True,
                     te=(("hf", 32, 2), ("openclip", 64, 3))),
    # the real SD1.5 shapes (860M UNet + 123M text encoder parameters), random weights, for benchmarks
    # the real SDXL shapes (2.57B UNet + 123M CLIP-L + 695M bigG parameters), random weights, for benchmarks
    "sdxl-full": TinySpec("sdxl", model_channels=320, channel_mult=(1, 2, 4), depths=(0, 2, 10), mid_depth=10,
                          linear_proj=True, te=(("hf", 768, 12), ("openclip", 1280, 32)), te_heads=12, te_mlp=4,
                          full_vae=True, size_dim=256, head_channels=64, openclip_heads=20),
    "sd1-full": TinySpec("sd1", model_channels=320, te=(("hf", 768, 12),), unet_heads=8, te_heads=12, te_mlp=4,
                         full_vae=True),
    # what Forge still takes for SD1.5 (its loader guesses the family from key shapes, and builds the text
    # encoder and VAE from SD1.5's own configs): the real text encoder and VAE, a reduced UNet of the real
    # widths (two levels, one res block each)
    "sd1-forge": TinySpec("sd1", model_channels=320, channel_mult=(1, 2), depths=(1, 1), te=(("hf", 768, 12),),
                          unet_heads=8, te_heads=12, te_mlp=4, full_vae=True, num_res_blocks=1),
    # and for SDXL (its guess checks the width 320, the depths 0,0,2,2,10,10, the context and the vector, not
    # the levels' widths): the real text encoders and VAE, a UNet of three levels all 320 wide, mid depth 1
    "sdxl-forge": TinySpec("sdxl", model_channels=320, channel_mult=(1, 1, 1), depths=(0, 2, 10), mid_depth=1,
                           linear_proj=True, te=(("hf", 768, 12), ("openclip", 1280, 32)), te_heads=12, te_mlp=4,
                           full_vae=True, size_dim=256, head_channels=64, openclip_heads=20),
}


def _rerandomise(module: nn.Module, generator: torch.Generator) -> None:
    # ldm zero-initialises output layers (zero_module); a tiny model with those zeros predicts 0 everywhere.
    for p in module.parameters():
        if p.ndim >= 1 and torch.count_nonzero(p) == 0:
            p.data.normal_(0.0, 0.02, generator=generator)


def build_unet(spec: TinySpec, generator: torch.Generator) -> nn.Module:
    unet = unet_from_config(_unet_params(spec))
    _rerandomise(unet, generator)
    return unet


def _shift_embeddings(weight: torch.Tensor, generator: torch.Generator) -> None:
    # a mean-zero text-encoder output hits a 0/0 in the webui's emphasis step; give the embeddings an offset
    with torch.no_grad():
        weight.add_(torch.rand(weight.shape[1], generator=generator) * 0.1 + 0.05)


def _offset_final_norm(holder: nn.Module, seed: int) -> None:
    # ...and the encoder's last layer norm makes every token's output mean zero again (its bias starts at 0):
    # the webui's emphasis step then divides 0 by 0 for some prompts and the UNet gets NaN. A bias of its
    # own generator (the other weights keep theirs) keeps the mean away from zero.
    norm = holder.transformer.text_model.final_layer_norm if hasattr(holder, "transformer") else holder.model.ln_final
    g = torch.Generator().manual_seed(seed + 0x1A7E)
    with torch.no_grad():
        norm.bias.copy_(torch.rand(norm.bias.shape, generator=g) * 0.2 + 0.1)


VAE_DDCONFIG = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 2, 2, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def _vae_config(spec: TinySpec) -> dict:
    return dict(FULL_VAE_DDCONFIG if spec.full_vae else VAE_DDCONFIG)


class TinySD(WebuiLayoutModel):
    """A webui-layout model of `spec`'s shapes with random weights (seeded)."""

    def __init__(self, spec: TinySpec, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        encoders = []
        for kind, width, layers in spec.te:
            holder = (HFTextEncoderHolder(width, layers, spec.te_heads, spec.te_mlp) if kind == "hf"
                      else OpenClipHolder(width, layers, spec.openclip_heads))
            _shift_embeddings(holder.token_embedding, g)
            _offset_final_norm(holder, seed)
            encoders.append(holder)
        unet = build_unet(spec, g)
        vae = LdmVAE(_vae_config(spec), sample_on_encode=spec.arch == "sdxl")     # as the webui's sgm VAE
        _rerandomise(vae, g)
        super().__init__(spec.arch, unet, encoders, vae, spec.parameterization)
        self.spec = spec


def build(arch: str = "sd1", seed: int = 0) -> TinySD:
    """A model of one of SPECS ('sd1', 'sd2', 'sdxl' tiny; 'sd1-full' the real SD1.5 shapes)."""
    if arch not in SPECS:
        raise ValueError(f"unknown architecture {arch!r}; one of {sorted(SPECS)}")
    # ldm prints a line per attention layer it makes; keep stdout for our own output (JSON, reports).
    # Layers initialise from the global RNG: seed it (in a fork, leaving the caller's RNG as it was) so
    # that the same seed gives the same model in every process.
    with contextlib.redirect_stdout(io.StringIO()), torch.random.fork_rng():
        torch.manual_seed(seed)
        return TinySD(SPECS[arch], seed)


def _unet_params(spec: TinySpec) -> dict:
    unet = dict(image_size=32, in_channels=4, out_channels=4, model_channels=spec.model_channels,
                attention_resolutions=[2 ** i for i, d in enumerate(spec.depths) if d > 0],
                num_res_blocks=spec.num_res_blocks,
                channel_mult=list(spec.channel_mult), context_dim=sum(w for _, w, _ in spec.te),
                use_linear_in_transformer=spec.linear_proj, use_spatial_transformer=True, legacy=False,
                transformer_depth=list(spec.depths) if spec.arch == "sdxl" else 1)
    if spec.linear_proj:
        unet["num_head_channels"] = spec.head_channels
    else:
        unet["num_heads"] = spec.unet_heads
    if spec.arch == "sdxl":
        unet["transformer_depth_middle"] = spec.mid_depth
        # sgm's vector: the second encoder's pooled output (its width: open_clip projects to the width
        # here) and six size numbers (real: 1280 + 6 * 256 = 2816)
        unet.update(num_classes="sequential", adm_in_channels=spec.te[1][1] + 6 * spec.size_dim)
    return unet


def ldm_config(spec: TinySpec, clip_folder: str | None = None) -> dict:
    """The ldm-style config (as the .yaml beside a webui checkpoint holds it) of a tiny model. It describes
    the UNet and the VAE; text encoder sizes are read off the checkpoint's keys, as for real models.
    `clip_folder`: a local CLIPTextModel config + tokenizer folder (write_clip_folder) that the real webui
    builds the SD1 text encoder from (there is no hub here); the config is then the whole one the real
    webui instantiates (ldm's LatentDiffusion with all its arguments)."""
    if clip_folder is not None:
        return _webui_config(spec, clip_folder)
    unet = _unet_params(spec)
    unet_key = "network_config" if spec.arch == "sdxl" else "unet_config"
    encoder = {"sd1": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
               "sd2": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
               "sdxl": "sgm.modules.GeneralConditioner"}[spec.arch]
    # text encoder sizes are read off a checkpoint's keys, but not the number of attention heads: real CLIP
    # models have one head per 64 channels, tiny ones not, so their head count is written here
    heads = [spec.te_heads if kind == "hf" else spec.openclip_heads for kind, _, _ in spec.te]
    return {"model": {
        "target": "sgm.models.diffusion.DiffusionEngine" if spec.arch == "sdxl" else "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "parameterization": spec.parameterization,
            unet_key: {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
            "cond_stage_config": {"target": encoder, "params": {"lora_ext_heads": heads}},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
                "embed_dim": 4, "ddconfig": _vae_config(spec)}},
        }}}


def save_checkpoint(model: TinySD, path: str, clip_folder: str | None = None) -> str:
    """Writes the model as a webui single-file checkpoint (safetensors, webui key layout) with a same-named
    ldm .yaml beside it, the webui's convention for checkpoints of non-standard shape. Returns the yaml path.
    With `clip_folder` (SD1), the yaml is the one the real webui loads, naming that folder (written here
    too) as the text encoder's source."""
    import yaml
    from safetensors.torch import save_file

    if clip_folder is not None:
        write_clip_folder(model, clip_folder)
    save_file({k: v.contiguous() for k, v in model.checkpoint_state_dict().items()}, path)
    yaml_path = os.path.splitext(path)[0] + ".yaml"
    with open(yaml_path, "w", encoding="utf-8") as f:
        yaml.safe_dump(ldm_config(model.spec, clip_folder), f, sort_keys=False)
    return yaml_path


OPENCLIP_ARCH = "lora-ext-tiny-bigG"     # the name the tiny SDXL's open_clip config is registered under


def openclip_config(spec: TinySpec) -> dict:
    """open_clip's model config of the tiny SDXL's second encoder (open_clip.add_model_config reads it as
    `<OPENCLIP_ARCH>.json`): sgm builds that encoder by this name, as it builds ViT-bigG-14 for the real one."""
    _, width, layers = spec.te[1]
    return {"embed_dim": width, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                               "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": spec.openclip_heads, "layers": layers}}


def _sgm_config(spec: TinySpec, clip_folder: str) -> dict:
    """sgm's DiffusionEngine config of the tiny SDXL, shaped like sgm's sd_xl_base.yaml: what the real webui
    instantiates (CLIP-L from `clip_folder`, bigG by OPENCLIP_ARCH, the three size embedders)."""
    size_embedder = lambda key: {"is_trainable": False, "input_key": key,  # noqa: E731
                                 "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
                                 "params": {"outdim": spec.size_dim}}
    unet = {k: v for k, v in _unet_params(spec).items() if k != "image_size"}     # sgm has no image_size
    unet.update(spatial_transformer_attn_type="softmax", use_checkpoint=False)
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": 0.13025, "disable_first_stage_autocast": True,
        "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "params": {
            "num_idx": 1000,
            "weighting_config": {"target": "sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting"},
            "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"},
            "discretization_config": {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}}},
        "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
            {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
             "params": {"layer": "hidden", "layer_idx": spec.te[0][2] - 1, "version": clip_folder}},
            {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
             "params": {"arch": OPENCLIP_ARCH, "version": None, "freeze": True, "layer": "penultimate",
                        "always_return_pooled": True, "legacy": False}},
            size_embedder("original_size_as_tuple"), size_embedder("crop_coords_top_left"),
            size_embedder("target_size_as_tuple")]}},
        "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": {
            "embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": {**_vae_config(spec), "attn_type": "vanilla"},
            "lossconfig": {"target": "torch.nn.Identity"}}},
    }}}


def _webui_config(spec: TinySpec, clip_folder: str) -> dict:
    if spec.arch == "sdxl":
        return _sgm_config(spec, clip_folder)
    if spec.arch != "sd1":
        raise ValueError("a real-webui config is written for SD1 and SDXL tiny models only")
    return {"model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.00085, "linear_end": 0.012, "num_timesteps_cond": 1, "log_every_t": 200,
            "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 64, "channels": 4,
            "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
            "scale_factor": 0.18215, "use_ema": False,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                            "params": {**_unet_params(spec), "use_checkpoint": False}},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
                "embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": _vae_config(spec),
                "lossconfig": {"target": "torch.nn.Identity"}}},
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                  "params": {"version": clip_folder}},
        }}}


def write_clip_folder(model: TinySD, folder: str) -> str:
    """The (first) text encoder's CLIPTextModel config and the CLIP tokenizer, as a folder `from_pretrained`
    reads (no weights: the checkpoint holds them)."""
    holder = model.text_holders()[0]
    holder.transformer.config.save_pretrained(folder)
    holder.tokenizer.save_pretrained(folder)
    return folder
