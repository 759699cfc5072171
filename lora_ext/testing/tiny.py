"""Tiny but real Stable Diffusion models in the webui's own module layout.

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
import copy
import io
import gzip
import json
import os
import tempfile
from dataclasses import dataclass

import torch
from torch import nn

VOCAB = 49408


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


SPECS = {
    "sd1": TinySpec("sd1"),
    "sd2": TinySpec("sd2", linear_proj=True, te=(("openclip", 32, 3),), parameterization="v"),
    # SDXL: no attention on the first level and deeper transformers further down (real: 0, 2, 10; mid 10)
    "sdxl": TinySpec("sdxl", channel_mult=(1, 2, 4), depths=(0, 2, 3), mid_depth=3, linear_proj=True,
                     te=(("hf", 32, 2), ("openclip", 64, 3))),
    # the real SD1.5 shapes (860M UNet + 123M text encoder parameters), random weights, for benchmarks
    "sd1-full": TinySpec("sd1", model_channels=320, te=(("hf", 768, 12),), unet_heads=8, te_heads=12, te_mlp=4,
                         full_vae=True),
}


def _rerandomise(module: nn.Module, generator: torch.Generator) -> None:
    # ldm zero-initialises output layers (zero_module); a tiny model with those zeros predicts 0 everywhere.
    for p in module.parameters():
        if p.ndim >= 1 and torch.count_nonzero(p) == 0:
            p.data.normal_(0.0, 0.02, generator=generator)


def _set_depth(spatial_transformer: nn.Module, depth: int) -> None:
    blocks = spatial_transformer.transformer_blocks
    while len(blocks) < depth:
        blocks.append(copy.deepcopy(blocks[0]))
    if depth > 1:
        # this ldm version indexes a per-block context list; sgm (SDXL's code) accepts one tensor for all blocks
        spatial_transformer.__class__ = _sgm_transformer_class(type(spatial_transformer))


_SGM_CLASSES: dict = {}


def _sgm_transformer_class(base: type) -> type:
    if base not in _SGM_CLASSES:
        def forward(self, x, context=None):
            if not isinstance(context, list):
                context = [context] * len(self.transformer_blocks)
            return base.forward(self, x, context)
        _SGM_CLASSES[base] = type(base.__name__, (base,), {"forward": forward})
    return _SGM_CLASSES[base]


def unet_from_config(params: dict) -> nn.Module:
    """An ldm UNetModel from the `params` of an ldm/sgm UNet config. This ldm version takes one transformer
    depth; sgm's per-level depths (a list, SDXL) are built by deepening the levels of a depth-1 model."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    params = dict(params)
    depth = params.pop("transformer_depth", 1)
    mid_depth = params.pop("transformer_depth_middle", None)
    if not isinstance(depth, list):
        return UNetModel(**params, transformer_depth=depth)
    unet = UNetModel(**params, transformer_depth=1)
    widths = [params["model_channels"] * m for m in params["channel_mult"]]
    for block in list(unet.input_blocks) + list(unet.output_blocks):
        for layer in block:
            if hasattr(layer, "transformer_blocks"):
                # a transformer's level is the first one of its width with attention (widths never shrink)
                width = layer.norm.num_channels
                _set_depth(layer, next(d for w, d in zip(widths, depth) if w == width and d > 0))
    _set_depth(unet.middle_block[1], mid_depth or depth[-1])
    return unet


def build_unet(spec: TinySpec, generator: torch.Generator) -> nn.Module:
    unet = unet_from_config(_unet_params(spec))
    _rerandomise(unet, generator)
    return unet


class HFTextEncoderHolder(nn.Module):
    """What the webui's FrozenCLIPEmbedderWithCustomWords holds as `.wrapped`: `.transformer`, `.tokenizer`."""

    def __init__(self, width: int, layers: int, generator: torch.Generator, heads: int = 2, mlp: int = 2):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=width * mlp,
                             num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                             projection_dim=width)
        self.transformer = CLIPTextModel(cfg)
        _shift_embeddings(self.transformer.text_model.embeddings.token_embedding.weight, generator)
        self.tokenizer = clip_tokenizer()

    def encode(self, prompts: list) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return self.transformer(ids.to(self.transformer.device)).last_hidden_state


class OpenClipHolder(nn.Module):
    """What the webui's FrozenOpenCLIPEmbedderWithCustomWords holds as `.wrapped`: `.model`, an open_clip CLIP
    whose visual tower was deleted (as ldm's FrozenOpenCLIPEmbedder does)."""

    def __init__(self, width: int, layers: int, generator: torch.Generator, heads: int = 2):
        super().__init__()
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        model = CLIP(embed_dim=width, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32),
                     text_cfg=CLIPTextCfg(width=width, heads=heads, layers=layers, vocab_size=VOCAB))
        del model.visual
        self.model = model
        _shift_embeddings(self.model.token_embedding.weight, generator)

    def encode(self, prompts: list) -> torch.Tensor:
        import open_clip

        m = self.model
        ids = open_clip.tokenize(prompts).to(m.token_embedding.weight.device)
        x = m.token_embedding(ids) + m.positional_embedding
        x = m.transformer(x.permute(1, 0, 2), attn_mask=m.attn_mask).permute(1, 0, 2)
        return m.ln_final(x)


def _shift_embeddings(weight: torch.Tensor, generator: torch.Generator) -> None:
    # a mean-zero text-encoder output hits a 0/0 in the webui's emphasis step; give the embeddings an offset
    with torch.no_grad():
        weight.add_(torch.rand(weight.shape[1], generator=generator) * 0.1 + 0.05)


class TextEncoderSlot(nn.Module):
    """The webui's hijack wraps each ldm text encoder in an object whose original is `.wrapped`."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped


class Conditioner(nn.Module):
    def __init__(self, embedders):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)


class DiffusionWrapper(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.diffusion_model = unet


VAE_DDCONFIG = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 2, 2, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
FULL_VAE_DDCONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                         ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)


class TinyVAE(nn.Module):
    """The ldm AutoencoderKL layout (`encoder`, `decoder`, `quant_conv`, `post_quant_conv`) without its
    pytorch-lightning base class."""

    def __init__(self, generator: torch.Generator, ddconfig: dict | None = None):
        super().__init__()
        from ldm.modules.diffusionmodules.model import Decoder, Encoder

        ddconfig = ddconfig or VAE_DDCONFIG
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)
        _rerandomise(self, generator)

    def encode(self, x):
        from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


class TinySD(nn.Module):
    """The attributes of the webui's loaded model that extensions use."""

    def __init__(self, spec: TinySpec, seed: int = 0, parts: tuple | None = None):
        """`parts`: (unet, text encoder holders, vae) already built (a checkpoint being loaded); else built
        from `spec` with random weights."""
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.spec = spec
        if parts is None:
            encoders = [HFTextEncoderHolder(w, n, g, spec.te_heads, spec.te_mlp) if kind == "hf"
                        else OpenClipHolder(w, n, g) for kind, w, n in spec.te]
            parts = (build_unet(spec, g), encoders, TinyVAE(g, FULL_VAE_DDCONFIG if spec.full_vae else None))
        unet, encoders, vae = parts
        self.model = DiffusionWrapper(unet)
        if spec.arch == "sdxl":
            self.conditioner = Conditioner([TextEncoderSlot(e) for e in encoders])
        else:
            self.cond_stage_model = TextEncoderSlot(encoders[0])
        self.first_stage_model = vae
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, 0).float())
        self.parameterization = spec.parameterization
        self.scale_factor = 0.13025 if spec.arch == "sdxl" else 0.18215
        self.is_sdxl = spec.arch == "sdxl"
        self.is_sd2 = spec.arch == "sd2"
        self.is_sd1 = spec.arch == "sd1"
        self.eval()

    def text_holders(self) -> list:
        return [e.wrapped for e in self.conditioner.embedders] if self.is_sdxl else [self.cond_stage_model.wrapped]

    def get_learned_conditioning(self, prompts: list) -> torch.Tensor:
        """Per-token text conditioning [batch, 77, context dim] (SDXL: both encoders side by side)."""
        return torch.cat([h.encode(prompts) for h in self.text_holders()], dim=-1)

    def checkpoint_state_dict(self) -> dict:
        """The state dict as a webui single-file checkpoint holds it (no `.wrapped.` in the keys)."""
        return {k.replace(".wrapped.", "."): v for k, v in self.state_dict().items()}


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
                attention_resolutions=[2 ** i for i, d in enumerate(spec.depths) if d > 0], num_res_blocks=2,
                channel_mult=list(spec.channel_mult), context_dim=sum(w for _, w, _ in spec.te),
                use_linear_in_transformer=spec.linear_proj, use_spatial_transformer=True, legacy=False,
                transformer_depth=list(spec.depths) if spec.arch == "sdxl" else 1)
    if spec.linear_proj:
        unet["num_head_channels"] = 16
    else:
        unet["num_heads"] = spec.unet_heads
    if spec.arch == "sdxl":
        unet["transformer_depth_middle"] = spec.mid_depth
    return unet


def ldm_config(spec: TinySpec) -> dict:
    """The ldm-style config (as the .yaml beside a webui checkpoint holds it) of a tiny model. It describes
    the UNet and the VAE; text encoder sizes are read off the checkpoint's keys, as for real models."""
    unet = _unet_params(spec)
    unet_key = "network_config" if spec.arch == "sdxl" else "unet_config"
    encoder = {"sd1": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
               "sd2": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
               "sdxl": "sgm.modules.GeneralConditioner"}[spec.arch]
    # text encoder sizes are read off a checkpoint's keys, but not the number of attention heads: real CLIP
    # models have one head per 64 channels, tiny ones not, so their head count is written here
    heads = [spec.te_heads if kind == "hf" else 2 for kind, _, _ in spec.te]
    return {"model": {
        "target": "sgm.models.diffusion.DiffusionEngine" if spec.arch == "sdxl" else "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "parameterization": spec.parameterization,
            unet_key: {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
            "cond_stage_config": {"target": encoder, "params": {"lora_ext_heads": heads}},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
                "embed_dim": 4, "ddconfig": dict(VAE_DDCONFIG)}},
        }}}


def save_checkpoint(model: TinySD, path: str) -> str:
    """Writes the model as a webui single-file checkpoint (safetensors, webui key layout) with a same-named
    ldm .yaml beside it, the webui's convention for checkpoints of non-standard shape. Returns the yaml path."""
    import yaml
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.checkpoint_state_dict().items()}, path)
    yaml_path = os.path.splitext(path)[0] + ".yaml"
    with open(yaml_path, "w", encoding="utf-8") as f:
        yaml.safe_dump(ldm_config(model.spec), f, sort_keys=False)
    return yaml_path


_TOKENIZER_CACHE: dict = {}


def clip_tokenizer():
    """The CLIP BPE tokenizer (49408 tokens) as transformers' CLIPTokenizer, built from the BPE merges file
    that open-clip-torch ships (the same merges OpenAI's vocab.json/merges.txt are made of)."""
    if "hf" in _TOKENIZER_CACHE:
        return _TOKENIZER_CACHE["hf"]
    import open_clip
    from transformers import CLIPTokenizer

    bpe_path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tempfile.mkdtemp(prefix="lora_ext_tok_")
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    _TOKENIZER_CACHE["hf"] = tok
    return tok


def _bytes_to_unicode() -> dict:
    # GPT-2/CLIP byte <-> printable-character table (a published constant of the BPE scheme)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
