"""TOML as the files users bring hold it (training configs, kohya dataset TOML, prompt files): Python 3.11's
tomllib, or tomli on the webui's Python 3.10 (install.py provides it)."""
from __future__ import annotations


def parse(text: str) -> dict:
    """The document's tables; ValueError saying where it is not TOML."""
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"not valid TOML ({e})") from None
