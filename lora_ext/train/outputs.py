"""Where a run will write, checked before the first step: a name that stays in its folder, a folder that is a
folder and takes files, no file replaced unless asked, no input written over. Finding these after an hour of
training would lose the hour."""
from __future__ import annotations

import os

from .config import ConfigError, TrainConfig

_BAD_CHARS = set('/\\:*?"<>|\0')


def final_path(cfg: TrainConfig) -> str:
    return os.path.join(cfg.output_dir, f"{cfg.output_name}.safetensors")


def check_outputs(cfg: TrainConfig) -> None:
    """Raises ConfigError saying what to change. Writes nothing (a folder to be created is checked at its
    nearest existing parent)."""
    name = cfg.output_name
    if not name or name in (".", "..") or name.startswith(".") or _BAD_CHARS & set(name) or len(name) > 200:
        raise ConfigError(f"output_name {name!r} must be a plain file name (no folders, no leading '.', none of "
                          f"{''.join(sorted(_BAD_CHARS - {chr(0)}))}); put folders in output_dir")
    for option in ("output_dir", "state_dir"):
        folder = getattr(cfg, option) or (cfg.output_dir if option == "state_dir" else "")
        _writable_folder(option, folder or ".")
    out = final_path(cfg)
    if os.path.exists(out) and not (cfg.overwrite or cfg.resume):
        raise ConfigError(f"{out} exists; choose another output_name, or allow overwriting (--overwrite)")
    if cfg.network_weights and os.path.exists(cfg.network_weights) and os.path.exists(out) \
            and os.path.samefile(cfg.network_weights, out):
        raise ConfigError(f"output {out} is the network_weights file it starts from; choose another output_name")


def _writable_folder(option: str, folder: str) -> None:
    existing = os.path.abspath(folder)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "" if existing == os.path.abspath(folder) else f" (its parent {existing!r})"
        raise ConfigError(f"{option} {folder!r}{where} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {folder!r} cannot be written (no permission on {existing!r}); choose "
                          "another folder")
