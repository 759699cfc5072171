"""Stable Diffusion models in the webui's own module layout, built from configs: what `modules.shared.sd_model`
looks like to extensions (`.model.diffusion_model`, `.cond_stage_model.wrapped...` for SD1/SD2,
`.conditioner.embedders[i].wrapped` for SDXL, `.first_stage_model`, `.alphas_cumprod`, `.parameterization`).
Headless runs load single-file checkpoints into these; the tiny test models (lora_ext.tiny) are these
with random weights. The parts are the real code the webui runs: ldm's UNet (package stable-diffusion-sdkit),
transformers' CLIPTextModel, open_clip's text tower, ldm's VAE encoder/decoder."""
from __future__ import annotations

import copy
import gzip
import json
import os
import tempfile

import torch
from torch import nn

VOCAB = 49408
FULL_VAE_DDCONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                         ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)


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
    params.setdefault("image_size", 32)      # unused by the model; sgm's configs leave it out, this ldm needs it
    depth = params.pop("transformer_depth", 1)
    mid_depth = params.pop("transformer_depth_middle", None)
    adm = params.pop("adm_in_channels", None) if params.get("num_classes") == "sequential" else None
    if adm is not None:
        params.pop("num_classes")
    params.pop("spatial_transformer_attn_type", None)        # sgm's attention choice; the math is the same
    if not isinstance(depth, list):
        return _with_label_emb(UNetModel(**params, transformer_depth=depth), adm)
    unet = _with_label_emb(UNetModel(**params, transformer_depth=1), adm)
    for block, level in zip(list(unet.input_blocks) + list(unet.output_blocks), _block_levels(params)):
        for layer in block:
            if hasattr(layer, "transformer_blocks"):
                _set_depth(layer, depth[level])
    _set_depth(unet.middle_block[1], mid_depth or depth[-1])
    return unet


def _block_levels(params: dict) -> list:
    """The level of each input block, then of each output block, as ldm's UNetModel lays them out (by position:
    levels of one width, as Forge's test SDXL has, cannot be told apart by width). Input: conv_in, then per
    level its res blocks and a downsample (none after the last level); output: per level from the deepest,
    its res blocks plus one."""
    levels, res = len(params["channel_mult"]), params["num_res_blocks"]
    inputs = [0] + [level for level in range(levels) for _ in range(res + (level < levels - 1))]
    outputs = [level for level in reversed(range(levels)) for _ in range(res + 1)]
    return inputs + outputs


def _with_label_emb(unet: nn.Module, adm_in_channels: int | None) -> nn.Module:
    """sgm's `num_classes: sequential`: the SDXL vector (pooled text + size embeddings) goes through
    label_emb = Sequential(Sequential(Linear(adm, 4C), SiLU, Linear(4C, 4C))) into the time embedding; ldm's
    forward adds label_emb(y) when num_classes is set, so only the layer is missing from this ldm version."""
    if adm_in_channels is None:
        return unet
    width = unet.time_embed[0].out_features
    unet.num_classes = "sequential"
    unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, width), nn.SiLU(), nn.Linear(width, width)))
    return unet


class HFTextEncoderHolder(nn.Module):
    """What the webui's FrozenCLIPEmbedderWithCustomWords holds as `.wrapped`: `.transformer`, `.tokenizer`."""

    def __init__(self, width: int, layers: int, heads: int = 2, mlp: int = 2, intermediate: int | None = None,
                 vocab: int = VOCAB, positions: int = 77):
        """`intermediate`: the MLP's width where a file states it (else `mlp` times the width)."""
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=intermediate or width * mlp,
                             num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=positions,
                             projection_dim=width)
        self.transformer = v4_layout(CLIPTextModel(cfg))
        self.tokenizer = clip_tokenizer()

    @property
    def token_embedding(self) -> torch.Tensor:
        return self.transformer.text_model.embeddings.token_embedding.weight

    def encode(self, prompts: list) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return self.transformer(ids.to(self.transformer.device)).last_hidden_state


class _TextModelLayout(nn.Module):
    """transformers 4's CLIPTextModel layout over a transformers 5 one, which has its parts (embeddings, encoder,
    final_layer_norm) on itself: here they sit under `.text_model`, the path of the checkpoint keys, of kohya's
    LoRA names and of the webui's code. Calls, and whatever else is asked of it, go to the model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.text_model = model

    def forward(self, *args, **kwargs):
        return self.text_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "text_model":
                raise
            return getattr(self.text_model, name)


def v4_layout(model: nn.Module) -> nn.Module:
    """`model` (a transformers CLIPTextModel) with its parts under `.text_model`, whichever transformers built it:
    transformers 5 flattened them into the model itself."""
    return model if hasattr(model, "text_model") else _TextModelLayout(model)


class OpenClipHolder(nn.Module):
    """What the webui's FrozenOpenCLIPEmbedderWithCustomWords holds as `.wrapped`: `.model`, an open_clip CLIP
    whose visual tower was deleted (as ldm's FrozenOpenCLIPEmbedder does)."""

    def __init__(self, width: int, layers: int, heads: int = 2, intermediate: int | None = None,
                 vocab: int = VOCAB, positions: int = 77):
        """`intermediate`: the MLP's width where a file states it (else open_clip's 4 times the width)."""
        super().__init__()
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        model = CLIP(embed_dim=width, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32),
                     text_cfg=CLIPTextCfg(width=width, heads=heads, layers=layers, vocab_size=vocab,
                                          context_length=positions))
        del model.visual
        if intermediate and intermediate != 4 * width:      # this open_clip's text config has no MLP ratio
            for block in model.transformer.resblocks:
                block.mlp.c_fc = nn.Linear(width, intermediate)
                block.mlp.c_proj = nn.Linear(intermediate, width)
        self.model = model

    @property
    def token_embedding(self) -> torch.Tensor:
        return self.model.token_embedding.weight

    def encode(self, prompts: list) -> torch.Tensor:
        import open_clip

        m = self.model
        ids = open_clip.tokenize(prompts).to(m.token_embedding.weight.device)
        x = m.token_embedding(ids) + m.positional_embedding
        x = m.transformer(x.permute(1, 0, 2), attn_mask=m.attn_mask).permute(1, 0, 2)
        return m.ln_final(x)


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


class LdmVAE(nn.Module):
    """The ldm AutoencoderKL layout (`encoder`, `decoder`, `quant_conv`, `post_quant_conv`) without its
    pytorch-lightning base class. `sample_on_encode`: encode() returns a sample, not the distribution, as
    sgm's AutoencoderKLInferenceWrapper (the webui's SDXL VAE) does."""

    def __init__(self, ddconfig: dict, sample_on_encode: bool = False):
        super().__init__()
        self.sample_on_encode = sample_on_encode
        from ldm.modules.diffusionmodules.model import Decoder, Encoder

        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)

    def encode(self, x):
        from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

        dist = DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))
        return dist.sample() if self.sample_on_encode else dist

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


class WebuiLayoutModel(nn.Module):
    """The attributes of the webui's loaded model that extensions use."""

    pending = None      # weights its loader has not read yet (hosts.checkpoint.Pending), or None

    def __init__(self, arch: str, unet: nn.Module, encoders: list, vae: nn.Module, parameterization: str = "eps"):
        super().__init__()
        self.model = DiffusionWrapper(unet)
        if arch == "sdxl":
            self.conditioner = Conditioner([TextEncoderSlot(e) for e in encoders])
        else:
            self.cond_stage_model = TextEncoderSlot(encoders[0])
        self.first_stage_model = vae
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, 0).float())
        self.parameterization = parameterization
        self.scale_factor = 0.13025 if arch == "sdxl" else 0.18215
        self.is_sdxl = arch == "sdxl"
        self.is_sd2 = arch == "sd2"
        self.is_sd1 = arch == "sd1"
        self.eval()

    def text_holders(self) -> list:
        return [e.wrapped for e in self.conditioner.embedders if hasattr(e, "wrapped")] if self.is_sdxl \
            else [self.cond_stage_model.wrapped]

    def get_learned_conditioning(self, prompts: list, width: int = 1024, height: int = 1024):
        """Per-token text conditioning [batch, 77, context dim]. SDXL: as the webui's sgm model gives it, a dict
        of "crossattn" (both encoders' penultimate states side by side) and "vector" (label_emb's input, for
        an uncropped image of the generation's size)."""
        if not self.is_sdxl:
            return torch.cat([h.encode(prompts) for h in self.text_holders()], dim=-1)
        from .conditioning import Size
        from . import for_model

        host = for_model(self)
        cond = host.encode_prompts(prompts, sizes=[Size.plain(width, height)] * len(prompts))
        return {"crossattn": cond.crossattn, "vector": cond.vector(host.size_dim)}

    def checkpoint_state_dict(self) -> dict:
        """The state dict as a webui single-file checkpoint holds it (no `.wrapped.` in the keys)."""
        return {k.replace(".wrapped.", "."): v for k, v in self.state_dict().items()}


_TOKENIZER_CACHE: dict = {}


def clip_tokenizer():
    """The CLIP BPE tokenizer (49408 tokens) as transformers' CLIPTokenizer, built from the BPE merges file
    that open-clip-torch ships (the same merges OpenAI's vocab.json/merges.txt are made of)."""
    if "hf" in _TOKENIZER_CACHE:
        return _TOKENIZER_CACHE["hf"]
    import importlib.util

    from transformers import CLIPTokenizer
    try:        # the BPE's byte alphabet, in its order (transformers 4 keeps it with CLIP's tokenizer, 5 moved it)
        from transformers.models.clip.tokenization_clip import bytes_to_unicode
    except ImportError:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

    # found, not imported: importing open_clip (timm and all) takes seconds
    bpe_path = os.path.join(importlib.util.find_spec("open_clip").submodule_search_locations[0],
                            "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
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
