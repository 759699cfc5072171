"""What `inspect` reports about a LoRA file: one JSON-ready dict."""
from __future__ import annotations

import json
import re

from .. import files, naming


MAX_METADATA_DEPTH = 16       # kohya's nested values go 3 deep (ss_tag_frequency: dataset -> tag -> count)


def _parse_metadata_value(value: str):
    """kohya stores nested values (ss_tag_frequency, ss_dataset_dirs, ss_network_args) as JSON strings: those
    are shown parsed; a value that is not JSON, or nests deeper than any tool writes (made to break readers),
    stays the text it is."""
    if value[:1] in "{[":
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):        # JSONDecodeError, an integer of thousands of digits
            return value
        if _depth(parsed) <= MAX_METADATA_DEPTH:
            return parsed
    return value


def _depth(value) -> int:
    """How deep lists and objects nest in a parsed JSON value (without recursion)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            todo += [(v, level + 1) for v in (item.values() if isinstance(item, dict) else item)]
    return deepest


def describe(path: str, arch: naming.Arch | None = None) -> dict:
    return describe_lora(files.read(path, arch))


def warnings(lora: files.LoraFile) -> list:
    """What about the file does not fit its architecture's layout: modules that would not be applied."""
    held, fits = lora.file_counts(), lora.counts()
    out = []
    for part, label in (("unet", "UNet"), ("te", "text-encoder")):
        missing = held[part] - fits[part]
        if missing:
            none = " none of them:" if not fits[part] else ""
            out.append(f"{missing} of its {held[part]} {label} modules fit no layer of a standard "
                       f"{lora.arch.name.upper()} model;{none} they are for a model of another layout (see "
                       "'unmatched'), and applying the file there leaves them out")
    return out


def describe_lora(lora: files.LoraFile) -> dict:
    return {
        "file": lora.path,
        "format": lora.format,
        "container": lora.container,
        "arch": lora.arch.name,
        "network": lora.network,
        "rank": _full(lora.ranks()),
        "alpha": lora.alphas(),
        "by_kind": lora.by_kind(),
        "modules": lora.file_counts(),
        "modules_fitting_the_layout": lora.counts(),
        "metadata": {k: _parse_metadata_value(v) for k, v in lora.metadata.items()},
        **lora.hashes(),
        "unmatched": lora.unmatched,
        "warnings": warnings(lora),
    }


_BLOCK = re.compile(r"^lora_(unet)_(down_blocks_\d+|mid_block|up_blocks_\d+|input_blocks_\d+|middle_block|output_blocks_\d+)"
                    r"|^lora_(te\d?)_.*?(?:layers|resblocks)_(\d+)_")
_BULKY = ("ss_tag_frequency", "ss_dataset_dirs", "ss_bucket_info", "ss_datasets", "ss_reg_dataset_dirs")


def block_of(name: str) -> str:
    """The block a kohya module name belongs to: 'unet down_blocks_1', 'te layer 3', 'te2 layer 11'."""
    m = _BLOCK.match(name)
    if m is None:
        return name.removeprefix("lora_").split("_")[0]
    if m.group(1):
        return f"unet {m.group(2)}"
    return f"{m.group(3)} layer {m.group(4)}"


def _span(values) -> str:
    """'4', '4-8'; 'full' for modules without a rank (LoKr with both factors full), ', full' where mixed."""
    numbers = [v for v in values if v is not None]
    if not numbers:
        return "full"
    lo, hi = min(numbers), max(numbers)
    span = f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"
    return span + (", full" if len(numbers) < len(values) else "")


def _full(ranks):
    """lora.ranks() for the report: a module without a rank (full LoKr factors) says 'full', not null."""
    if isinstance(ranks, dict):
        return {n: "full" if r is None else r for n, r in ranks.items()}
    return "full" if ranks is None else ranks


def block_rows(lora) -> list:
    """[block, modules, rank, alpha] per block, in file order ('4-8' where a block's modules differ)."""
    groups: dict = {}
    for name, m in {**lora.modules, **lora.foreign}.items():
        groups.setdefault(block_of(name), []).append(m)
    return [[b, len(ms), _span([m.rank for m in ms]), _span([m.alpha if m.alpha is not None else m.rank for m in ms])]
            for b, ms in groups.items()]


def setting_rows(metadata: dict) -> list:
    """[setting, value] for the training settings in ss_* metadata (the bulky dataset records left out)."""
    return [[k.removeprefix("ss_"), str(v)] for k, v in sorted(metadata.items())
            if k.startswith("ss_") and k not in _BULKY]


def tag_rows(metadata: dict) -> list:
    """[tag, count, folder] from ss_tag_frequency, most frequent first."""
    freq = _parse_metadata_value(metadata.get("ss_tag_frequency", "{}"))
    rows = []
    if isinstance(freq, dict):
        for folder, tags in freq.items():
            if isinstance(tags, dict):
                rows += [[tag.strip(), int(n), folder] for tag, n in tags.items() if str(n).isdigit()]
    return sorted(rows, key=lambda r: (-r[1], r[0]))
