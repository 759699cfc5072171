"""Whole-file LoRA operations (resize, merge several into one, extract from two checkpoints): read, compute
with lowrank/merge, write a kohya file with metadata saying what was done. The CLI and the Merge tab both
call these; bad input raises ToolError with a message that says what to change."""
from __future__ import annotations

import json
import os

from . import files, lowrank


class ToolError(ValueError):
    pass


def parse_lora_arg(text: str) -> tuple:
    """FILE[:RATIO[:TE_RATIO]] -> (file, unet ratio, te ratio). Read from the right, so that paths with
    colons (C:\\...) survive; the text-encoder ratio defaults to the UNet one."""
    parts = text.split(":")
    ratios = []
    while len(parts) > 1 and len(ratios) < 2:
        try:
            ratios.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = ":".join(parts)
    unet = ratios[0] if ratios else 1.0
    return path, unet, ratios[1] if len(ratios) > 1 else unet


def energy_summary(kept: dict) -> dict:
    """The kept energy (share of the squared singular values) over modules: min, median, mean."""
    values = sorted(kept.values())
    if not values:
        return {"modules": 0}
    return {"modules": len(values), "min": values[0], "median": values[len(values) // 2],
            "mean": sum(values) / len(values)}


def _write(path, modules, metadata, overwrite, precision) -> None:
    from .merge import PRECISIONS
    files.write_kohya(path, files.kohya_tensors(modules, PRECISIONS[precision]), metadata, overwrite=overwrite)


def resize_file(src: str, out: str, rank: int | None = None, energy: float | None = None, precision: str = "fp16",
                overwrite: bool = False) -> dict:
    if (rank is None) == (energy is None):
        raise ToolError("give a rank or a kept energy (0 < energy <= 1), not both")
    lora = files.read(src)
    if any(m.network != "lora" for m in lora.modules.values()):
        raise ToolError(f"{src}: resizing LoHa/LoKr files is not supported (LoRA and LoCon are)")
    modules, kept = lowrank.resize(lora.modules, rank, energy)
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
    loras, arch = [], None
    for path, weight in items:
        lora = files.read(path, arch)
        arch = arch or lora.arch
        loras.append((lora.modules, weight))
    modules, kept = lowrank.merge_loras(loras, rank)
    top = max(m.rank for m in modules.values())        # every module's alpha is its rank (scale 1)
    meta = files.network_metadata("lora", top, top, arch,
                                  lora_ext_merged_loras=json.dumps([[os.path.basename(p), w] for p, w in items]))
    _write(out, modules, meta, overwrite, precision)
    return {"out": out, "modules": len(modules), "rank": top, "kept_energy": energy_summary(kept), "per_module": kept}


def extract_file(base: str, tuned: str, out: str, rank: int = 32, conv_rank: int | None = None,
                 precision: str = "fp16", overwrite: bool = False) -> dict:
    from .merge import MergeError, extract

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
