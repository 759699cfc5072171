"""The preview prompts of a run, as kohya's `sample_prompts` gives them: the path of a prompt file (.txt: a
prompt a line, '#' lines skipped; .toml: a [prompt] table whose [[prompt.subset]] entries each override it;
.json: a list of prompts or of objects), each prompt line with kohya's per-prompt options after it:
`--n` negative prompt, `--w` / `--h` size, `--d` seed, `--l` CFG scale, `--s` steps, `--ss` sampler. The tab
and our configs also take the prompts themselves, one a line, options and all."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from ..weights import number

FILE_EXT = (".txt", ".toml", ".json")
MAX_FILE_BYTES = 1 << 20


class PromptError(ValueError):
    """A prompt file that cannot be read; the message says what to fix."""


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int | None = None        # None: the run's resolution
    height: int | None = None
    seed: int | None = None         # None: the run's seed plus the prompt's place
    steps: int | None = None        # None: sample_steps
    scale: float | None = None      # None: the previews' CFG scale
    sampler: str | None = None      # asked for; the previews have one sampler, and say so


# kohya's options on a prompt line (train_util.line_to_prompt_dict): the letter, the field, how to read it
_OPTIONS = (("ss", "sampler", r"(\S+)"), ("w", "width", r"(\d+)"), ("h", "height", r"(\d+)"), ("d", "seed", r"(\d+)"),
            ("s", "steps", r"(\d+)"), ("l", "scale", r"([\d.]+)"), ("n", "negative", r"(.+)"))
_KOHYA_KEYS = {"prompt": "prompt", "negative_prompt": "negative", "width": "width", "height": "height",
               "seed": "seed", "sample_steps": "steps", "scale": "scale", "sample_sampler": "sampler"}


def from_line(line: str) -> SamplePrompt:
    """One prompt line: the text before the first ' --', then kohya's options; an option it does not know,
    or a value of the wrong kind, raises PromptError."""
    text, *options = line.strip().split(" --")
    found = {}
    for option in options:
        for letter, name, value in _OPTIONS:
            m = re.fullmatch(rf"{letter} {value}", option.strip(), re.IGNORECASE | re.DOTALL)
            if m:
                found[name] = m[1]
                break
        else:
            raise PromptError(f"prompt {text[:40]!r}: --{option.strip()[:30]} is none of kohya's prompt options "
                              "(--n negative, --w width, --h height, --d seed, --l CFG scale, --s steps, --ss sampler)")
    return _prompt({"prompt": text, **found})


def _prompt(values: dict) -> SamplePrompt:
    """A SamplePrompt from field values, numbers checked (kohya's ranges: steps 1-1000, a size a multiple of
    8 from 64 up, rounded down as kohya does)."""
    out = SamplePrompt(str(values.get("prompt", "")).strip())
    if not out.prompt:
        raise PromptError("a sample prompt is empty")
    out.negative = str(values.get("negative") or "").strip()
    out.sampler = values.get("sampler")
    for name, low, high in (("width", 64, 4096), ("height", 64, 4096), ("seed", 0, 2 ** 63 - 1), ("steps", 1, 1000),
                            ("scale", 1, 30)):
        if values.get(name) is None:
            continue
        kind = float if name == "scale" else int
        try:
            x = number(values[name], kind)
        except (TypeError, ValueError, OverflowError):
            raise PromptError(f"prompt {out.prompt[:40]!r}: {name} {values[name]!r} is not "
                              f"{'a number' if kind is float else 'a whole number'}") from None
        if not low <= x <= high:
            label = "CFG scale" if name == "scale" else name
            raise PromptError(f"prompt {out.prompt[:40]!r}: {label} {x:g} is out of range ({low}-{high})")
        setattr(out, name, x - x % 8 if name in ("width", "height") else x)
    return out


def load(entries: list) -> list:
    """[SamplePrompt] of the config's `sample_prompts`: an entry naming a .txt / .toml / .json file is that
    file's prompts (kohya's meaning), any other is a prompt line. PromptError says what to fix."""
    out = []
    for entry in entries:
        entry = str(entry).strip()
        if not entry:
            continue
        if entry.lower().endswith(FILE_EXT) and "\n" not in entry:
            out += _from_file(entry)
        else:
            out += [from_line(line) for line in entry.splitlines() if line.strip() and not line.startswith("#")]
    return out


def _from_file(path: str) -> list:
    if not os.path.isfile(path):
        raise PromptError(f"sample_prompts file {path} does not exist (or is not a file)")
    if os.path.getsize(path) > MAX_FILE_BYTES:
        raise PromptError(f"sample_prompts file {path} is over {MAX_FILE_BYTES >> 20} MB; previews need a few prompts")
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".txt":
            return [from_line(line) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        items = _toml_items(text) if ext == ".toml" else json.loads(text)
    except PromptError as e:
        raise PromptError(f"{path}: {e}") from None
    except (ValueError, RecursionError) as e:           # TOML and JSON decode errors are ValueErrors
        # toml_text words its own ("not valid TOML (...)"), and so does _toml_items
        why = str(e)[:160] if ext == ".toml" else f"not valid {ext[1:].upper()} ({str(e)[:120]})"
        raise PromptError(f"{path}: {why}") from None
    if not isinstance(items, list):
        raise PromptError(f"{path}: a JSON prompt file is a list of prompts")
    try:
        return [from_line(item) if isinstance(item, str) else _from_dict(item) for item in items]
    except PromptError as e:
        raise PromptError(f"{path}: {e}") from None


def _toml_items(text: str) -> list:
    from ..toml_text import parse

    data = parse(text)
    shared = data.get("prompt")
    if not isinstance(shared, dict) or not isinstance(shared.get("subset"), list):
        raise ValueError("a TOML prompt file has a [prompt] table with [[prompt.subset]] entries")
    common = {k: v for k, v in shared.items() if k != "subset"}
    return [{**common, **subset} for subset in shared["subset"]]


def _from_dict(item) -> SamplePrompt:
    if not isinstance(item, dict):
        raise PromptError(f"a prompt entry is {type(item).__name__}, not text or a table")
    unknown = sorted(set(item) - set(_KOHYA_KEYS) - {"enum"})
    if unknown:
        raise PromptError(f"prompt {str(item.get('prompt', ''))[:40]!r}: {', '.join(unknown)} is not a prompt key "
                          f"the previews take ({', '.join(_KOHYA_KEYS)})")
    return _prompt({_KOHYA_KEYS[k]: v for k, v in item.items() if k in _KOHYA_KEYS})
