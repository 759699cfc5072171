"""One place for LoRA target names: kohya name <-> webui module path <-> diffusers module path, per architecture.

Everything is derived from the shape of the architecture (levels, transformer depth per level, text encoders),
never from hand-written tables:
- webui paths are the module paths under the webui's loaded model (`model.diffusion_model.input_blocks.1.1
  .proj_in`, `cond_stage_model.wrapped.transformer.text_model...`, `conditioner.embedders.1.wrapped.model...`);
  the checkpoint key of a weight is that path without `.wrapped` (`checkpoint_key`).
- diffusers paths are those of the diffusers pipeline components (`unet.down_blocks.0.attentions.0.proj_in`,
  `text_encoder.text_model...`, `text_encoder_2...`).
- kohya names are what files hold: `lora_unet_` + the diffusers UNet path (SD1/SD2) or the ldm/sgm path (SDXL),
  and `lora_te_` / `lora_te1_` / `lora_te2_` + the transformers text-model path; '.' becomes '_'.
  Files in the wild use both UNet styles for every architecture, so each target answers to both.

The text encoders held by the webui as open_clip models (SD2, SDXL's second) keep q, k and v in one
`in_proj_weight` of an nn.MultiheadAttention: their q/k/v targets name that module and a row block `qkv`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

# kinds of layer, as kohya sorts them: Linear and 1x1 Conv take the network dim, kxk Conv the conv dim; and the
# norm layers (GroupNorm, LayerNorm), which only full/diff and norm modules change
LINEAR, CONV1X1, CONV, NORM = "linear", "conv1x1", "conv", "norm"


@dataclass(frozen=True)
class TextEncoderShape:
    kind: str       # 'hf' (transformers CLIPTextModel) | 'openclip'
    layers: int


@dataclass(frozen=True)
class Arch:
    name: str                       # 'sd1' | 'sd2' | 'sdxl'
    channel_mult: tuple             # per UNet level
    depths: tuple                   # transformer depth per level; 0 = no attention at that level
    mid_depth: int
    linear_proj: bool               # proj_in/proj_out are Linear (SD2, SDXL) or 1x1 Conv (SD1)
    text_encoders: tuple            # of TextEncoderShape
    num_res_blocks: int = 2

    @property
    def sgm_style(self) -> bool:
        """Whether kohya writes this architecture's UNet names in the original (ldm/sgm) style."""
        return self.name == "sdxl"


# The full-size architectures; tiny test models are structural subsets of these (fewer layers, same paths).
SD1 = Arch("sd1", (1, 2, 4, 4), (1, 1, 1, 0), 1, False, (TextEncoderShape("hf", 12),))
SD2 = Arch("sd2", (1, 2, 4, 4), (1, 1, 1, 0), 1, True, (TextEncoderShape("openclip", 24),))
SDXL = Arch("sdxl", (1, 2, 4), (0, 2, 10), 10, True, (TextEncoderShape("hf", 12), TextEncoderShape("openclip", 32)))
STANDARD = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}


@dataclass(frozen=True)
class Target:
    kohya: str          # the name we write, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    alias: str          # the same module in the other UNet style (equal to kohya for text encoders)
    webui: str          # module path under the webui's sd_model
    diffusers: str      # module path under the diffusers pipeline
    component: str      # 'unet' | 'te' | 'te1' | 'te2'
    kind: str           # LINEAR | CONV1X1 | CONV | NORM
    locon: bool         # only targeted when conv layers are trained (inside res blocks, down/up samplers)
    qkv: int | None = None  # row block of an nn.MultiheadAttention in_proj_weight (0 q, 1 k, 2 v)
    extra: bool = False     # read and applied, never trained: see extra_targets()

    @property
    def checkpoint_key(self) -> str:
        """Key of this target's weight in a webui single-file checkpoint."""
        return self.checkpoint_path + (".in_proj_weight" if self.qkv is not None else ".weight")

    @property
    def checkpoint_bias_key(self) -> str:
        return self.checkpoint_path + (".in_proj_bias" if self.qkv is not None else ".bias")

    @property
    def checkpoint_path(self) -> str:
        return self.webui.replace(".wrapped.", ".")

    @property
    def is_unet(self) -> bool:
        return self.component == "unet"


def kohya_key(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


# --- UNet -----------------------------------------------------------------------------------------------

# children of each container: (ldm name, diffusers name, kind); 'skip' only exists where channels change
_RES_CHILDREN = (("in_layers.2", "conv1", CONV), ("out_layers.3", "conv2", CONV),
                 ("emb_layers.1", "time_emb_proj", LINEAR), ("skip_connection", "conv_shortcut", CONV1X1))


def _attn_children(depth: int, linear_proj: bool) -> Iterator[tuple[str, str]]:
    proj = LINEAR if linear_proj else CONV1X1
    yield "proj_in", proj
    for j in range(depth):
        for attn in ("attn1", "attn2"):
            for leaf in ("to_q", "to_k", "to_v", "to_out.0"):
                yield f"transformer_blocks.{j}.{attn}.{leaf}", LINEAR
        yield f"transformer_blocks.{j}.ff.net.0.proj", LINEAR
        yield f"transformer_blocks.{j}.ff.net.2", LINEAR
    yield "proj_out", proj


def _unet_containers(arch: Arch) -> Iterator[tuple]:
    """(kind, ldm path, diffusers path, extra) for every res block, transformer and sampler, in ldm order.
    extra: transformer depth for 'attn', whether a skip conv exists for 'res'."""
    n, levels = arch.num_res_blocks, len(arch.depths)
    idx = 1
    for lv, depth in enumerate(arch.depths):
        for i in range(n):
            changes = i == 0 and arch.channel_mult[lv] != (arch.channel_mult[lv - 1] if lv else 1)
            yield "res", f"input_blocks.{idx}.0", f"down_blocks.{lv}.resnets.{i}", changes
            if depth:
                yield "attn", f"input_blocks.{idx}.1", f"down_blocks.{lv}.attentions.{i}", depth
            idx += 1
        if lv < levels - 1:
            yield "down", f"input_blocks.{idx}.0", f"down_blocks.{lv}.downsamplers.0", None
            idx += 1
    yield "res", "middle_block.0", "mid_block.resnets.0", False
    if arch.mid_depth:
        yield "attn", "middle_block.1", "mid_block.attentions.0", arch.mid_depth
    yield "res", "middle_block.2", "mid_block.resnets.1", False
    idx = 0
    for k, lv in enumerate(reversed(range(levels))):
        depth = arch.depths[lv]
        for i in range(n + 1):
            # every output res block takes the skip connection's channels too, so it always has a skip conv
            yield "res", f"output_blocks.{idx}.0", f"up_blocks.{k}.resnets.{i}", True
            if depth:
                yield "attn", f"output_blocks.{idx}.1", f"up_blocks.{k}.attentions.{i}", depth
            if i == n and lv > 0:
                yield "up", f"output_blocks.{idx}.{2 if depth else 1}", f"up_blocks.{k}.upsamplers.0", None
            idx += 1


def _unet_targets(arch: Arch) -> Iterator[Target]:
    for kind, ldm, diff, extra in _unet_containers(arch):
        if kind == "attn":
            children = [(c, c, k, False) for c, k in _attn_children(extra, arch.linear_proj)]
        elif kind == "res":
            children = [(a, b, k, True) for a, b, k in _RES_CHILDREN if extra or a != "skip_connection"]
        else:
            children = [("op" if kind == "down" else "conv", "conv", CONV, True)]
        for ldm_child, diff_child, layer_kind, locon in children:
            yield _unet_target(arch, f"{ldm}.{ldm_child}", f"{diff}.{diff_child}", layer_kind, locon)


# layers outside the LoRA targets that LyCORIS files also change (its conv_in / conv_out / time embedding names;
# with train_norm, full/diff and norm modules, the norm layers inside each block): (ldm child, diffusers child)
_RES_NORMS = (("in_layers.0", "norm1"), ("out_layers.0", "norm2"))
_UNET_SINGLES = (("input_blocks.0.0", "conv_in", CONV), ("out.2", "conv_out", CONV), ("out.0", "conv_norm_out", NORM),
                 ("time_embed.0", "time_embedding.linear_1", LINEAR), ("time_embed.2", "time_embedding.linear_2", LINEAR))
_SDXL_SINGLES = (("label_emb.0.0", "add_embedding.linear_1", LINEAR), ("label_emb.0.2", "add_embedding.linear_2", LINEAR))


def _unet_target(arch: Arch, ldm_path: str, diff_path: str, kind: str, locon: bool, extra: bool = False) -> Target:
    sgm, dif = kohya_key("lora_unet", ldm_path), kohya_key("lora_unet", diff_path)
    return Target(kohya=sgm if arch.sgm_style else dif, alias=dif if arch.sgm_style else sgm,
                  webui=f"model.diffusion_model.{ldm_path}", diffusers=f"unet.{diff_path}",
                  component="unet", kind=kind, locon=locon, extra=extra)


def _unet_extra(arch: Arch) -> Iterator[Target]:
    for ldm, diff, kind in _UNET_SINGLES + (_SDXL_SINGLES if arch.name == "sdxl" else ()):
        yield _unet_target(arch, ldm, diff, kind, kind == CONV, extra=True)
    for kind, ldm, diff, depth in _unet_containers(arch):
        if kind == "res":
            norms = _RES_NORMS
        elif kind == "attn":
            norms = [("norm", "norm")] + [(f"transformer_blocks.{j}.norm{k}",) * 2 for j in range(depth) for k in (1, 2, 3)]
        else:
            continue
        for ldm_child, diff_child in norms:
            yield _unet_target(arch, f"{ldm}.{ldm_child}", f"{diff}.{diff_child}", NORM, False, extra=True)


# --- text encoders --------------------------------------------------------------------------------------

_HF_LEAVES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
_OPENCLIP_LEAF = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}


def _text_encoders(arch: Arch) -> Iterator[tuple]:
    """(shape, component, webui holder path, diffusers root) of each text encoder."""
    several = len(arch.text_encoders) > 1
    for i, te in enumerate(arch.text_encoders):
        holder = f"conditioner.embedders.{i}.wrapped" if arch.name == "sdxl" else "cond_stage_model.wrapped"
        yield te, f"te{i + 1}" if several else "te", holder, "text_encoder" if i == 0 else f"text_encoder_{i + 1}"


def _te_target(component: str, hf_path: str, webui: str, diffusers_root: str, kind: str, **kw) -> Target:
    name = kohya_key(f"lora_{component}", hf_path)
    return Target(kohya=name, alias=name, webui=webui, diffusers=f"{diffusers_root}.{hf_path}",
                  component=component, kind=kind, locon=False, **kw)


def _te_targets(arch: Arch) -> Iterator[Target]:
    for te, component, holder, diffusers_root in _text_encoders(arch):
        for layer in range(te.layers):
            for leaf in _HF_LEAVES:
                hf_path = f"text_model.encoder.layers.{layer}.{leaf}"
                qkv = None
                if te.kind == "hf":
                    webui = f"{holder}.transformer.{hf_path}"
                elif leaf in _QKV:
                    webui, qkv = f"{holder}.model.transformer.resblocks.{layer}.attn", _QKV[leaf]
                else:
                    webui = f"{holder}.model.transformer.resblocks.{layer}.{_OPENCLIP_LEAF[leaf]}"
                yield _te_target(component, hf_path, webui, diffusers_root, LINEAR, qkv=qkv)


def _te_norms(arch: Arch) -> Iterator[Target]:
    for te, component, holder, diffusers_root in _text_encoders(arch):
        pairs = [(f"text_model.encoder.layers.{n}.layer_norm{k}", f"model.transformer.resblocks.{n}.ln_{k}")
                 for n in range(te.layers) for k in (1, 2)] + [("text_model.final_layer_norm", "model.ln_final")]
        for hf_path, openclip_path in pairs:
            webui = f"{holder}.{'transformer.' + hf_path if te.kind == 'hf' else openclip_path}"
            yield _te_target(component, hf_path, webui, diffusers_root, NORM, extra=True)


def targets(arch: Arch) -> list[Target]:
    """Every LoRA target of the architecture: text encoder(s) first, then the UNet, in module order."""
    return list(_te_targets(arch)) + list(_unet_targets(arch))


def extra_targets(arch: Arch) -> list[Target]:
    """The layers files may change beyond the LoRA targets, which we read and apply but never train: the UNet's
    conv_in, conv_out, time (and SDXL's label) embedding, and every norm layer of the UNet and text encoders."""
    return list(_te_norms(arch)) + list(_unet_extra(arch))


class NameIndex:
    """Looks a module name up in any of the styles files use: kohya (both UNet styles), diffusers paths
    (with or without the component prefix), webui module paths, and webui's own '_'-joined layer names."""

    def __init__(self, arch: Arch):
        self.arch = arch
        self.targets = targets(arch) + extra_targets(arch)
        self.by_kohya = {t.kohya: t for t in self.targets}
        self._lookup: dict[str, Target] = {}
        for t in self.targets:
            for name in (t.kohya, t.alias, t.diffusers, t.webui):
                self._lookup[name] = t
        if arch.name != "sdxl":
            # some SD1/SD2 files name their single text encoder te1
            for t in self.targets:
                if not t.is_unet:
                    self._lookup[t.kohya.replace("lora_te_", "lora_te1_", 1)] = t

    def find(self, name: str) -> Target | None:
        return self._lookup.get(name)


def arch_from_model(sd_model) -> Arch:
    """The Arch of a loaded webui-layout model (tiny or full-size), read off its weights' names and shapes."""
    return arch_from_state_dict({k.replace(".wrapped.", "."): tuple(v.shape) for k, v in sd_model.state_dict().items()})


def _indices(shapes: dict, pattern: str) -> list:
    """The sorted numbers the first group of `pattern` matches at the start of the keys."""
    import re

    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes for m in [rx.match(k)] if m})


def arch_from_state_dict(shapes: dict) -> Arch:
    """The Arch of a checkpoint in the webui's key layout, from {key: shape} alone (no tensor data needed)."""
    import re

    def indices(pattern):
        return _indices(shapes, pattern)

    if any(k.startswith("conditioner.") for k in shapes):
        holders = ["conditioner.embedders.0.", "conditioner.embedders.1."]
    else:
        holders = ["cond_stage_model."]
    tes = []
    for h in holders:
        hf = indices(re.escape(h) + r"transformer\.text_model\.encoder\.layers\.(\d+)\.")
        if hf:
            tes.append(TextEncoderShape("hf", len(hf)))
        else:
            tes.append(TextEncoderShape("openclip", len(indices(re.escape(h) + r"model\.transformer\.resblocks\.(\d+)\."))))
    name = "sdxl" if len(tes) > 1 else ("sd2" if tes[0].kind == "openclip" else "sd1")
    return arch_of_unet(shapes, name, tuple(tes))


def arch_of_unet(shapes: dict, name: str, text_encoders: tuple, unet: str = "model.diffusion_model.") -> Arch:
    """The Arch of an ldm-layout UNet from {key: shape} (its keys under `unet`), for a family `name` whose
    text encoders are `text_encoders`."""
    import re

    def indices(pattern):
        return _indices(shapes, pattern)

    def depth(prefix):
        return len(indices(re.escape(prefix) + r"transformer_blocks\.(\d+)\."))

    model_channels = shapes[unet + "input_blocks.0.0.weight"][0]
    mults, depths, nrb, level_blocks = [], [], None, 0
    for i in indices(re.escape(unet) + r"input_blocks\.(\d+)\.")[1:]:
        if f"{unet}input_blocks.{i}.0.op.weight" in shapes:        # a Downsample closes a level
            nrb = nrb or level_blocks
            level_blocks = 0
            continue
        if level_blocks == 0:
            mults.append(shapes[f"{unet}input_blocks.{i}.0.out_layers.3.weight"][0] // model_channels)
            depths.append(depth(f"{unet}input_blocks.{i}.1."))
        level_blocks += 1
    nrb = nrb or level_blocks
    proj = next((v for k, v in shapes.items() if k.startswith(unet) and k.endswith(".proj_in.weight")), None)
    return Arch(name, tuple(mults), tuple(depths), depth(f"{unet}middle_block.1."), proj is not None and len(proj) == 2,
                text_encoders, nrb)
