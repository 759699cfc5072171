"""What `inspect` reports about a LoRA file: one JSON-ready dict."""
from __future__ import annotations

import json

from . import files, naming


def _parse_metadata_value(value: str):
    # kohya stores nested values (ss_tag_frequency, ss_dataset_dirs, ss_network_args) as JSON strings
    if value[:1] in "{[":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass
    return value


def describe(path: str, arch: naming.Arch | None = None) -> dict:
    lora = files.read(path, arch)
    return {
        "file": path,
        "format": lora.format,
        "container": lora.container,
        "arch": lora.arch.name,
        "network": lora.network,
        "rank": lora.ranks(),
        "alpha": lora.alphas(),
        "by_kind": lora.by_kind(),
        "modules": lora.counts(),
        "metadata": {k: _parse_metadata_value(v) for k, v in lora.metadata.items()},
        **lora.hashes(),
        "unmatched": lora.unmatched,
    }
