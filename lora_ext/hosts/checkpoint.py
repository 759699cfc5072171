"""Loading a single-file checkpoint (the webui's key layout) for headless work, as the webui would hold it.

The architecture comes from the keys (`cond_stage_model.transformer.` SD1, `cond_stage_model.model.` SD2,
`conditioner.` SDXL). Shapes come from a same-named ldm .yaml beside the file when there is one (the webui's
convention for checkpoints of other shapes), else the standard SD1/SD2/SDXL configs; text encoder sizes are read
off the keys. Pickled checkpoints load with weights_only=True."""
from __future__ import annotations

import contextlib
import io
import os
import re

import torch

from ..safetensors_io import FileProblem, Reader
from . import ldm_layout


class CheckpointError(ValueError):
    pass


_SD_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                num_res_blocks=2, channel_mult=[1, 2, 4, 4], use_spatial_transformer=True, transformer_depth=1,
                legacy=False)
STANDARD_UNET = {
    "sd1": dict(_SD_UNET, num_heads=8, context_dim=768),
    "sd2": dict(_SD_UNET, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
    # sgm's sd_xl_base.yaml: every SDXL derivative (Pony, Illustrious, NoobAI ...) keeps these shapes
    "sdxl": dict(_SD_UNET, attention_resolutions=[4, 2], channel_mult=[1, 2, 4], num_head_channels=64,
                 transformer_depth=[1, 2, 10], context_dim=2048, use_linear_in_transformer=True,
                 num_classes="sequential", adm_in_channels=2816),
}
STANDARD_VAE = ldm_layout.FULL_VAE_DDCONFIG


def read_state_dict(path: str) -> dict:
    from ..pickles import load_pickle_safely
    from ..safetensors_io import FileProblem, read_header

    _regular_file(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            with open(path, "rb") as f:
                read_header(f, os.path.getsize(path))       # a named problem before the library's own
            return load_file(path)
        except FileProblem as e:
            raise CheckpointError(f"{path}: {e}") from None
        except Exception as e:
            raise CheckpointError(f"{path}: safetensors could not read it ({e})") from None
    try:
        sd = load_pickle_safely(path)
    except FileProblem as e:
        raise CheckpointError(f"{path}: cannot be read safely: {e}") from None
    return sd.get("state_dict", sd)


def _regular_file(path: str) -> None:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file" if not os.path.exists(path) else
                              f"{path}: not a regular file")


def _arch_of(sd: dict, path: str) -> str:
    if any(k.startswith("conditioner.") for k in sd):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in sd):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in sd):
        return "sd1"
    raise CheckpointError(f"{path}: not a Stable Diffusion checkpoint in the webui's layout (no text encoder keys)")


def _count(sd: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd for m in [rx.match(k)] if m})


def _text_encoder(sd: dict, prefix: str, heads_hint):
    """The encoder at `prefix`, built in every size its tensors state (width, layers, MLP width, vocabulary,
    positions), not by the usual ratios; the heads, which no tensor states, from the config (`heads_hint`)."""
    if any(k.startswith(prefix + "transformer.") for k in sd):
        p = prefix + "transformer.text_model."
        vocab, width = sd[p + "embeddings.token_embedding.weight"].shape
        layers = _count(sd, re.escape(p) + r"encoder\.layers\.(\d+)\.")
        return ldm_layout.HFTextEncoderHolder(
            width, layers, _heads(heads_hint, width), intermediate=sd[p + "encoder.layers.0.mlp.fc1.weight"].shape[0],
            vocab=vocab, positions=sd[p + "embeddings.position_embedding.weight"].shape[0])
    p = prefix + "model."
    vocab, width = sd[p + "token_embedding.weight"].shape
    layers = _count(sd, re.escape(p) + r"transformer\.resblocks\.(\d+)\.")
    return ldm_layout.OpenClipHolder(width, layers, _heads(heads_hint, width),
                                     intermediate=sd[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                                     vocab=vocab, positions=sd[p + "positional_embedding"].shape[0])


def _heads(hint, width: int) -> int:
    # CLIP's encoders have 64-wide heads; one narrower than 64 (a tiny test model) gets one head
    heads = hint or max(1, width // 64)
    if width % heads:
        raise CheckpointError(f"the text encoder is {width} wide, which {heads} attention heads do not divide; "
                              "its .yaml (or the config.json it names) gives the right count")
    return heads


def _text_encoder_heads(params: dict) -> list:
    """Attention heads per text encoder, which a checkpoint's keys do not tell: from the local folder a config
    names as an encoder's `version` (its config.json), open_clip's config of the `arch` an sgm (SDXL) config
    names, or our tiny models' own hint. None where nothing says (the reader then assumes 64-wide heads)."""
    sgm = ((params.get("conditioner_config") or {}).get("params") or {}).get("emb_models")
    if sgm:
        return [_heads_of(m.get("params") or {}) for m in sgm if m.get("input_key", "txt") == "txt"]
    cond = params.get("cond_stage_config") or {}
    hint = (cond.get("params") or {}).get("lora_ext_heads")
    return hint or [_heads_of(cond.get("params") or {})]


def _heads_of(encoder_params: dict) -> int | None:
    import json

    config_json = os.path.join(str(encoder_params.get("version", "")), "config.json")
    if os.path.isfile(config_json):
        with open(config_json, encoding="utf-8") as f:
            heads = json.load(f).get("num_attention_heads")
        return heads if isinstance(heads, int) and heads > 0 else None
    if encoder_params.get("arch"):
        import open_clip
        config = open_clip.get_model_config(encoder_params["arch"]) or {}
        return (config.get("text_cfg") or {}).get("heads")
    return None


def _sgm_parameterization(params: dict) -> str | None:
    """sgm configs (SDXL) name the parameterization by the denoiser's scaling class (VScaling: v-prediction)."""
    scaling = ((params.get("denoiser_config") or {}).get("params") or {}).get("scaling_config") or {}
    target = str(scaling.get("target", ""))
    return "v" if target.endswith("VScaling") else "eps" if target else None


def checkpoint_keys(model) -> dict:
    """{checkpoint key: model key} for a webui-layout model: checkpoint files lack the `.wrapped.` of the
    webui's text encoder holders."""
    return {k.replace(".wrapped.", "."): k for k in model.state_dict()}


def load_checkpoint(path: str, hold=None, later=None):
    """A model with the webui's layout (lora_ext.hosts.ldm_layout) holding the checkpoint's weights.
    Built without initialising its weights (every one is then read from the file) and filled one tensor at
    a time, so that loading needs the model's memory and no more. `hold` (select, dtype_for): each parameter
    `select(model)` yields is made in `dtype_for(the dtype the file stores it in)` instead, where that is not
    None (a mixed-precision run's frozen weights, which would otherwise be made in fp32 and then cast; or a
    run's frozen weights held as the file stores them). `later(model)`: modules whose weights are checked
    against the file now and read from it only when `model.pending.read()` is called (a safetensors file;
    a pickled one is in memory whole anyway): until then their memory is allocated and never written, so it
    is not yet the process's (on a CPU). A headless run reads its UNet so, once its text encoders are freed."""
    sd = _open_tensors(path)
    pending = None
    try:
        model = _build(path, sd)
        if hold is not None:
            _hold(model, sd, *hold)
        deferred = _untouched(later(model)) if later is not None and isinstance(sd, Reader) else set()
        pending = _fill(path, model, sd, deferred)
    except FileProblem as e:
        raise CheckpointError(f"{path}: {e}") from None
    finally:
        if pending is None:
            sd.close()
    model.pending = pending
    return model


class Pending:
    """A loaded model's weights not read from its file yet: `read()` reads them (once), from the file as it
    was opened at load, then closes it; `nbytes`, the memory they take once read."""

    def __init__(self, path: str, reader, pairs: list):
        self.path, self.reader, self.pairs = path, reader, pairs       # pairs: [(checkpoint key, parameter)]
        self.nbytes = sum(p.numel() * p.element_size() for _, p in pairs)

    def read(self) -> None:
        if self.reader is None:
            return
        try:
            for key, param in self.pairs:       # into the storage it has now (a session may have cast it)
                self.reader.read_into(key, param.data)
        except FileProblem as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        finally:
            self.reader.close()
            self.reader, self.pairs = None, []

    @property
    def done(self) -> bool:
        return self.reader is None


def _untouched(modules) -> set:
    """The ids of the modules' parameters, each given fresh storage that nothing has written (ldm's builders
    zero some layers, which would make their pages the process's before any weight is read)."""
    ids = set()
    for module in modules:
        for p in module.parameters():
            p.data = torch.empty(p.shape, dtype=p.dtype, device=p.device)
            ids.add(id(p))
    return ids


def _hold(model, sd, select, dtype_for) -> None:
    own = model.state_dict(keep_vars=True)
    stored = {id(own[model_key]): sd[k].dtype for k, model_key in checkpoint_keys(model).items() if k in sd}
    for p in list(select(model)):
        dtype = dtype_for(stored.get(id(p)))
        if dtype is not None and dtype != p.dtype:
            p.data = torch.empty(p.shape, dtype=dtype)


def _build(path: str, sd):
    import yaml

    arch = _arch_of(sd, path)
    yaml_path = os.path.splitext(path)[0] + ".yaml"
    params = {}
    if os.path.isfile(yaml_path):
        with open(yaml_path, encoding="utf-8") as f:
            params = (yaml.safe_load(f) or {}).get("model", {}).get("params", {})
    unet_cfg = (params.get("unet_config") or params.get("network_config") or {}).get("params") or STANDARD_UNET[arch]
    vae_cfg = params.get("first_stage_config", {}).get("params", {}).get("ddconfig") or STANDARD_VAE
    vae_cfg = {**STANDARD_VAE, **vae_cfg}
    heads = _text_encoder_heads(params)
    parameterization = params.get("parameterization") or _sgm_parameterization(params) or ("v" if arch == "sd2" else "eps")
    prefixes = ["conditioner.embedders.0.", "conditioner.embedders.1."] if arch == "sdxl" else ["cond_stage_model."]
    # ldm prints a line per layer it builds
    with _weights_left_uninitialised(), contextlib.redirect_stdout(io.StringIO()):
        try:
            encoders = [_text_encoder(sd, p, heads[i] if i < len(heads) else None) for i, p in enumerate(prefixes)]
        except KeyError as e:
            raise CheckpointError(f"{path}: its text encoder lacks {e.args[0]}; the file is incomplete") from None
        unet = ldm_layout.unet_from_config(unet_cfg)
        vae = ldm_layout.LdmVAE(vae_cfg, sample_on_encode=arch == "sdxl")
    return ldm_layout.WebuiLayoutModel(arch, unet, encoders, vae, parameterization)


def _fill(path: str, model, sd, deferred: set = frozenset()) -> Pending | None:
    """Every parameter of `model` read from `sd` (buffers too where the file has them: they are constants
    the model builds itself, position_ids, which current transformers no longer saves, alphas_cumprod); those
    whose ids are in `deferred` only checked, and left to the Pending returned (None when there are none)."""
    by_ckpt_key = checkpoint_keys(model)
    buffers = {k for k, _ in model.named_buffers()}
    missing = [k for k, model_key in by_ckpt_key.items() if k not in sd and model_key not in buffers]
    if missing:
        arch = "sdxl" if model.is_sdxl else "sd2" if model.is_sd2 else "sd1"
        raise CheckpointError(f"{path}: {len(missing)} weights of a {arch.upper()} model are missing "
                              f"(e.g. {missing[0]}); is a .yaml with its shapes needed beside it?")
    own = model.state_dict(keep_vars=True)
    later = []
    for ckpt_key, model_key in by_ckpt_key.items():
        if ckpt_key not in sd:
            continue
        dest, shape = own[model_key].data, sd[ckpt_key].shape
        if shape != dest.shape:
            raise CheckpointError(f"{path}: its weights do not fit the shapes of its config ({ckpt_key} is "
                                  f"{list(shape)} in the file, {list(dest.shape)} in the model)")
        if id(own[model_key]) in deferred:
            later.append((ckpt_key, own[model_key]))
        else:
            sd.read_into(ckpt_key, dest)
    return Pending(path, sd, later) if later else None


def _open_tensors(path: str):
    """The file's tensors by name, each with `.shape`, `read_into(name, tensor)` and `close()`: a safetensors
    file read tensor by tensor (open until closed); a pickled one loaded whole (weights_only)."""
    if not path.endswith(".safetensors"):
        return _InMemory(read_state_dict(path))
    _regular_file(path)
    try:
        return Reader(path)
    except FileProblem as e:
        raise CheckpointError(f"{path}: {e}") from None


class _InMemory(dict):
    def read_into(self, name: str, dest) -> None:
        dest.copy_(self[name])

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _weights_left_uninitialised():
    """Modules built with their weights' memory allocated but not filled (random initialisation of a
    billion weights takes seconds, and every one is overwritten from the file): torch.nn.init's fillers,
    and transformers' own initialisation, do nothing meanwhile. Buffers are built as usual."""
    from torch.nn import init

    names = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "xavier_uniform_",
             "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")
    saved = {n: getattr(init, n) for n in names}
    stack = contextlib.ExitStack()
    try:
        from transformers.modeling_utils import no_init_weights
        stack.enter_context(no_init_weights())
    except ImportError:
        pass
    with stack:
        for n in names:
            setattr(init, n, lambda tensor, *a, **k: tensor)
        try:
            yield
        finally:
            for n, f in saved.items():
                setattr(init, n, f)
