"""Read and write LoRA files.

Reads kohya/LyCORIS safetensors (LoRA, LoCon, LoHa, LoKr), PEFT and older diffusers keys, kohya .pt state
dicts and cloneofsimo .pt lists; writes kohya-format safetensors with kohya's ss_* metadata and pre-computed
hashes. Every problem with a file raises `LoraFileError`, whose message names the file and says what is
wrong. Pickled files load with `weights_only=True`: no code from a user's file ever runs.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from . import formats, naming
from .library import LORA_EXT, PICKLE_EXT, SAFETENSORS_EXT
from .networks.kinds import TYPES
from .networks.stored import BadModule, StoredModule
from .atomic import atomic_write
from .pickles import load_pickle_safely
from .safetensors_io import FileProblem, addnet_hashes, file_hashes
from .safetensors_io import load as load_safetensors



class LoraFileError(ValueError):
    """A LoRA file that cannot be used; str() is a message for the user."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


@dataclass
class LoraFile:
    path: str
    format: str                     # 'kohya' | 'peft' | 'diffusers' | 'cloneofsimo'
    container: str                  # 'safetensors' | 'pt'
    arch: naming.Arch
    modules: dict                   # kohya name -> StoredModule
    targets: dict                   # kohya name -> naming.Target
    metadata: dict = field(default_factory=dict)
    unmatched: list = field(default_factory=list)
    foreign: dict = field(default_factory=dict)     # kohya name -> StoredModule, for layers `arch` lacks (a
                                                    # model of another layout): kept by whole-file tools

    def file_counts(self) -> dict:
        """What the file holds: modules per part, whether or not `arch` has their layers."""
        every = list(self.modules) + list(self.foreign)
        unet = sum(1 for n in every if n.startswith("lora_unet_"))
        return {"unet": unet, "te": len(every) - unet}

    @property
    def network(self) -> str:
        """'lora', 'locon', 'loha', 'lokr' (or several joined by '/'), with '+dora' for weight-decomposed files."""
        kinds = {m.network for m in self.modules.values()}
        if kinds == {"lora"}:
            name = "locon" if any(self.targets[n].locon for n in self.modules) else "lora"
        else:
            name = "/".join(sorted(kinds))
        return name + "+dora" if any(m.is_dora for m in self.modules.values()) else name

    def counts(self) -> dict:
        unet = sum(1 for n in self.modules if self.targets[n].is_unet)
        return {"unet": unet, "te": len(self.modules) - unet}

    def ranks(self):
        """One rank if every module has the same, else {module: rank}."""
        return _same_or_map({n: m.rank for n, m in self.modules.items()})

    def alphas(self):
        return _same_or_map({n: (m.alpha if m.alpha is not None else m.rank) for n, m in self.modules.items()})

    def by_kind(self) -> dict:
        """{'linear' | 'conv' | 'norm': {'rank': r, 'alpha': a}} where each kind of layer has one rank and alpha (the
        usual case: network dim/alpha and conv dim/alpha); a kind with mixed values maps to None."""
        out = {}
        sort = {naming.CONV: "conv", naming.NORM: "norm"}
        for kind in ("linear", "conv", "norm"):
            mods = [m for n, m in self.modules.items() if sort.get(self.targets[n].kind, "linear") == kind]
            if mods:
                ranks = {m.rank for m in mods}
                alphas = {m.alpha if m.alpha is not None else m.rank for m in mods}
                out[kind] = ({"rank": ranks.pop(), "alpha": alphas.pop()}
                             if len(ranks) == 1 and len(alphas) == 1 else None)
        return out

    def hashes(self) -> dict:
        return file_hashes(self.path)


def _same_or_map(values: dict):
    distinct = set(values.values())
    return distinct.pop() if len(distinct) == 1 else values


def load_container(path: str) -> tuple[object, dict, str]:
    """(tensors dict or list, metadata, container) of a file, without interpreting its keys."""
    if not os.path.exists(path):
        raise FileProblem("no such file")
    if os.path.isdir(path):
        raise FileProblem("is a folder, not a file")
    if not os.path.isfile(path):        # a FIFO or a device would block the read forever
        raise FileProblem("is not a regular file")
    ext = os.path.splitext(path)[1].lower()
    if ext in SAFETENSORS_EXT:
        tensors, metadata = load_safetensors(path)
        return tensors, metadata, "safetensors"
    if ext in PICKLE_EXT:
        obj = load_pickle_safely(path)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        return obj, {}, "pt"
    raise FileProblem(f"unknown file type {ext!r}; LoRA files end in {', '.join(LORA_EXT)}")


def read(path: str, arch: naming.Arch | None = None) -> LoraFile:
    """Reads a LoRA file. `arch`: the architecture of the model it is for (e.g. the loaded model's); without
    it the file's own architecture is detected and its names are checked against the full-size model.
    A file made for another architecture than `arch` raises LoraFileError."""
    try:
        return _read(path, arch)
    except (FileProblem, BadModule, ValueError) as e:
        if isinstance(e, LoraFileError):
            raise
        raise LoraFileError(path, str(e)) from None


def _read(path: str, arch: naming.Arch | None) -> LoraFile:
    import torch

    raw, metadata, container = load_container(path)
    if isinstance(raw, (list, tuple)):
        if not raw or not all(isinstance(t, torch.Tensor) for t in raw):
            raise FileProblem("it holds a list that is not a list of tensors")
        arch = arch or naming.SD1
        grouped, stray, style = formats.group_cloneofsimo(list(raw), arch), [], "cloneofsimo"
        for parts in grouped.values():
            parts["alpha"] = torch.tensor(float(parts["lora_down.weight"].shape[0]))   # cloneofsimo: scale 1
    elif isinstance(raw, dict):
        bad = [k for k, v in raw.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise FileProblem(f"entries that are not tensors: {', '.join(map(str, bad[:5]))}")
        unsupported = formats.unsupported_types(raw)
        if unsupported:
            raise FileProblem(f"it holds {', '.join(sorted(unsupported))} modules (e.g. "
                              f"{next(iter(unsupported.values()))}), which lora_ext does not apply yet (it applies "
                              f"{', '.join(t.title for t in TYPES)}, each with DoRA)")
        style = formats.key_style(raw)
        if style is None:
            sample = ", ".join(list(raw)[:3])
            raise FileProblem(f"no LoRA keys found (first keys: {sample or 'none'}); not a LoRA file, or an "
                              "unknown format")
        grouped, stray = (formats.group_kohya if style == "kohya" else formats.group_diffusers)(raw)
    else:
        raise FileProblem(f"it holds a {type(raw).__name__}, not tensors")

    detected, certain = formats.detect_arch(grouped, metadata)
    if arch is not None and style != "cloneofsimo" and certain and detected != arch.name:
        raise FileProblem(f"it is a LoRA for {detected.upper()}, the model is {arch.name.upper()}")
    arch = arch or naming.STANDARD[detected]
    index = naming.NameIndex(arch)
    modules, targets, unmatched, foreign = {}, {}, list(stray), {}
    for name, parts in grouped.items():
        target = index.find(name)
        if target is None:
            unmatched.extend(f"{name}.{p}" for p in parts)
            if style == "kohya" and name.startswith(("lora_unet_", "lora_te")):
                try:
                    foreign[name] = _module(name, parts)
                except FileProblem:         # not a whole module: it stays a list of unmatched keys
                    pass
            continue
        module = _module(name, parts)
        if target.kohya in modules:
            raise FileProblem(f"module {name} appears twice (as {target.kohya} in another naming style)")
        modules[target.kohya], targets[target.kohya] = module, target
    if not modules:
        raise FileProblem(f"none of its {len(grouped)} modules fits a {arch.name.upper()} model "
                          f"(e.g. {next(iter(grouped), '?')})")
    order = {t.kohya: i for i, t in enumerate(index.targets)}
    modules = dict(sorted(modules.items(), key=lambda kv: order[kv[0]]))
    return LoraFile(path, style, container, arch, modules, targets, metadata, sorted(unmatched), foreign)


def _module(name: str, parts: dict) -> StoredModule:
    try:
        return StoredModule.from_parts(parts)       # which refuses NaN and infinite values too
    except BadModule as e:
        raise FileProblem(f"module {name}: {e}") from None


# --- writing -----------------------------------------------------------------------------------------------

def kohya_tensors(modules: dict, dtype=None) -> dict:
    """{kohya key: tensor} for {kohya name: StoredModule}, alpha written as a 0-dim tensor as kohya does."""
    import torch

    out = {}
    for name, m in modules.items():
        for part, t in m.parts.items():
            t = t.detach().to("cpu")
            out[f"{name}.{part}"] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
        alpha = m.alpha if m.alpha is not None else m.rank
        if alpha is not None:
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype or torch.float32)
    return out


def write_kohya(path: str, tensors: dict, metadata: dict | None = None, overwrite: bool = False) -> dict:
    """Writes kohya-format safetensors atomically. Metadata values are stored as strings (kohya's form);
    sshs_model_hash / sshs_legacy_hash are computed as kohya does (over the ss_* metadata only), so the
    webui and the additional-networks extension find the hash without reading the file. Returns the
    metadata written."""
    from safetensors.torch import save

    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: LoRA files we write end in .safetensors")
    meta = {k: v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)
            for k, v in (metadata or {}).items() if v is not None}
    ss_only = {k: v for k, v in meta.items() if k.startswith("ss_")}
    model_hash, legacy_hash = addnet_hashes(save(tensors, ss_only))
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hash, legacy_hash
    atomic_write(path, save(tensors, meta), overwrite=overwrite)
    return meta


def network_metadata(network: str, dim: int, alpha: float, arch: naming.Arch, module: str = "networks.lora",
                     args: dict | None = None, **extra) -> dict:
    """The ss_* keys kohya writes that describe the network itself (training keys come from the trainer);
    `args` are the network_args (LyCORIS's algo and options), else LoCon's conv_dim/conv_alpha from extra."""
    base = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[arch.name]
    meta = {"ss_network_module": module, "ss_network_dim": dim, "ss_network_alpha": alpha,
            "ss_base_model_version": base, "ss_v2": arch.name == "sd2"}
    conv_dim, conv_alpha = extra.pop("conv_dim", None), extra.pop("conv_alpha", None)
    if network == "locon":
        meta["ss_network_args"] = {"conv_dim": str(conv_dim), "conv_alpha": str(conv_alpha)}
    if args:
        meta["ss_network_args"] = {k: str(v) for k, v in args.items()}
    meta.update(extra)
    return meta
