"""Whole-file LoRA operations (resize, merge several into one, extract from two checkpoints): read, compute
with lowrank/merge, write a kohya file with metadata saying what was done. The CLI and the Merge tab both
call these; bad input raises ToolError with a message that says what to change."""
from __future__ import annotations

import json
import math
import os

from .. import files
from . import lowrank
from ..atomic import refuse_inputs_as_output
from ..library import LORA_EXT
from ..networks.kinds import TYPES
from ..weights import weight_value

LORA_SUFFIXES = tuple(LORA_EXT) + (".ckpt",)


class ToolError(ValueError):
    pass


def parse_lora_arg(text: str) -> tuple:
    """FILE[:RATIO[:TE_RATIO]] -> (file, unet ratio, te ratio). Read from the right, so that paths with
    colons (C:\\...) survive; the text-encoder ratio defaults to the UNet one. A ratio that is not a finite
    number in [-100, 100] raises ToolError (weights.weight_value)."""
    parts = text.split(":")
    ratios = []
    while len(parts) > 1 and len(ratios) < 2:
        try:
            ratios.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = ":".join(parts)
    head, sep, tail = path.rpartition(":")
    if sep and head.lower().endswith(LORA_SUFFIXES):
        raise ToolError(f"{text}: the ratio {tail!r} is not a number (FILE:RATIO[:TE_RATIO], e.g. {head}:0.8)")
    try:
        for r in ratios:
            weight_value(r, f"{text}: the ratio")
    except ValueError as e:
        raise ToolError(str(e)) from None
    unet = ratios[0] if ratios else 1.0
    return path, unet, ratios[1] if len(ratios) > 1 else unet


def check_rank(option: str, rank, allow_none: bool = True) -> None:
    if rank is None and allow_none:
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= 4096:
        raise ToolError(f"{option} must be a whole number from 1 to 4096, not {rank!r}")


def energy_summary(kept: dict) -> dict:
    """The kept energy (share of the squared singular values) over modules: min, median, mean."""
    values = sorted(kept.values())
    if not values:
        return {"modules": 0}
    return {"modules": len(values), "min": values[0], "median": values[len(values) // 2],
            "mean": sum(values) / len(values)}


def _write(path, modules, metadata, overwrite, precision) -> None:
    """Writes the file in `precision`; refuses, writing nothing, where a value does not fit it (a huge alpha
    folded into the factors overflows fp16 to inf, a file our own reader would then refuse)."""
    import torch

    from ..merge import PRECISIONS
    tensors = files.kohya_tensors(modules, PRECISIONS[precision])
    bad = next((k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        wider = "fp32" if precision != "fp32" else None
        raise ToolError(f"{bad} has values beyond {precision}'s range (a huge alpha or weight in the inputs)"
                        + (f": save as {wider} (--precision {wider})" if wider else "") + "; nothing was written")
    files.write_kohya(path, tensors, metadata, overwrite=overwrite)


def resize_file(src: str, out: str, rank: int | None = None, energy: float | None = None, precision: str = "fp16",
                overwrite: bool = False) -> dict:
    if (rank is None) == (energy is None):
        raise ToolError("give a rank or a kept energy (0 < energy <= 1), not both")
    check_rank("the rank", rank)
    if energy is not None and not (isinstance(energy, (int, float)) and math.isfinite(energy) and 0 < energy <= 1):
        raise ToolError(f"the kept energy is a share: more than 0, at most 1 (e.g. 0.9), not {energy}")
    refuse_inputs_as_output(out, [src])
    lora = files.read(src)
    held = {**lora.modules, **lora.foreign}     # every module the file holds, whatever model it is for
    if any(not m.kind.factored for m in held.values()):
        kinds = sorted({m.kind.title for m in held.values() if not m.kind.factored})
        raise ToolError(f"{src}: resizing {'/'.join(kinds)} files is not supported (only types that are a product of "
                        f"two factors are: {', '.join(t.title for t in TYPES if t.factored)}, LoCon included)")
    modules, kept = lowrank.resize(held, rank, energy)
    top = max(m.rank for m in modules.values())        # every module's alpha is its rank (scale 1)
    meta = {**lora.metadata, "ss_network_dim": top, "ss_network_alpha": top,
            "lora_ext_resized": json.dumps(energy_summary(kept))}
    _write(out, modules, meta, overwrite, precision)
    return {"out": out, "rank": top, "kept_energy": energy_summary(kept), "per_module": kept}


def merge_lora_files(items: list, out: str, rank: int | None = None, precision: str = "fp16",
                     overwrite: bool = False) -> dict:
    """`items`: [(path, weight)]; ranks concatenated, or SVD down to `rank`."""
    if not items:
        raise ToolError("give at least one LoRA to merge")
    check_rank("the rank", rank)
    refuse_inputs_as_output(out, [p for p, _ in items])
    loras, arch, shapes = [], None, {}
    for path, weight in items:
        try:
            weight_value(weight, f"{path}: the weight")
        except ValueError as e:
            raise ToolError(str(e)) from None
        lora = files.read(path, arch)
        arch = arch or lora.arch
        held = {**lora.modules, **lora.foreign}     # every module the file holds, as resize takes them
        for name, module in held.items():
            seen = shapes.setdefault(name, (path, module.out_in()))
            if seen[1] != module.out_in():
                raise ToolError(f"{path} and {seen[0]} are for different models: layer {name} is "
                                f"{module.out_in()} in one, {seen[1]} in the other")
        loras.append((held, weight))
    modules, kept = lowrank.merge_loras(loras, rank)
    top = max(m.rank for m in modules.values())        # every module's alpha is its rank (scale 1)
    meta = files.network_metadata("lora", top, top, arch,
                                  lora_ext_merged_loras=json.dumps([[os.path.basename(p), w] for p, w in items]))
    _write(out, modules, meta, overwrite, precision)
    return {"out": out, "modules": len(modules), "rank": top, "kept_energy": energy_summary(kept), "per_module": kept}


def extract_file(base: str, tuned: str, out: str, rank: int = 32, conv_rank: int | None = None,
                 precision: str = "fp16", overwrite: bool = False) -> dict:
    from ..merge import MergeError
    from .extract import extract

    check_rank("the rank", rank, allow_none=False)
    check_rank("the conv rank", conv_rank)
    refuse_inputs_as_output(out, [base, tuned])
    try:
        modules, kept, arch = extract(base, tuned, rank, conv_rank)
    except MergeError as e:
        raise ToolError(str(e)) from None
    if not modules:
        raise ToolError("the two checkpoints do not differ in any LoRA layer")
    extra = {"conv_dim": conv_rank, "conv_alpha": conv_rank} if conv_rank else {}
    meta = files.network_metadata("locon" if conv_rank else "lora", rank, rank, arch, **extra,
                                  lora_ext_extracted=json.dumps({"base": os.path.basename(base),
                                                                 "tuned": os.path.basename(tuned)}))
    _write(out, modules, meta, overwrite, precision)
    return {"out": out, "modules": len(modules), "kept_energy": energy_summary(kept), "per_module": kept}
