"""Concepts for the concept editor: any number of image folders, each with repeats, a name (the caption for
images without one) and a caption extension, regularization folders among them. Converts to and from the
dreambooth extension's concepts JSON and kohya's dataset TOML, and lays plain folders out in kohya's `N_name`
convention by linking or copying, never moving or deleting an original."""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass

from .train.dataset import IMAGE_EXT
from .weights import flag_value


@dataclass
class Concept:
    folder: str
    repeats: int = 1
    name: str = ""                  # caption for images without one; the folder's name when empty
    caption_extension: str = ".txt"
    is_reg: bool = False

    @property
    def label(self) -> str:
        name = self.name or os.path.basename(os.path.normpath(self.folder))
        return re.sub(r"[^\w\- ]+", "_", name).strip() or "concept"


class ConceptError(ValueError):
    pass


# --- kohya dataset TOML --------------------------------------------------------------------------------------

def from_kohya_toml(text: str) -> list:
    from .toml_text import parse

    try:
        data = parse(text)
    except ValueError as e:
        raise ConceptError(str(e)) from None
    general = data.get("general", {})
    concepts = []
    for dataset in data.get("datasets", []):
        for sub in dataset.get("subsets", []):
            if "image_dir" not in sub:
                raise ConceptError("a [[datasets.subsets]] entry has no image_dir")
            if "metadata_file" in sub:
                raise ConceptError(f"{sub['image_dir']}: fine-tuning subsets (metadata_file) are not concepts")
            ext = sub.get("caption_extension", dataset.get("caption_extension", general.get("caption_extension", ".txt")))
            concepts.append(Concept(sub["image_dir"], int(sub.get("num_repeats", 1)), sub.get("class_tokens", ""),
                                    ext, _flag(sub.get("is_reg", False), sub["image_dir"])))
    if not concepts:
        raise ConceptError("no [[datasets.subsets]] with an image_dir")
    return concepts


def _flag(value, folder: str) -> bool:
    try:
        return flag_value(value, "is_reg")
    except ValueError as e:
        raise ConceptError(f"{folder}: {e}") from None


def to_kohya_toml(concepts: list) -> str:
    lines = ["[[datasets]]", ""]
    for c in concepts:
        lines += ["  [[datasets.subsets]]", f"  image_dir = {json.dumps(c.folder)}", f"  num_repeats = {int(c.repeats)}",
                  f"  caption_extension = {json.dumps(c.caption_extension)}"]
        if c.name:
            lines.append(f"  class_tokens = {json.dumps(c.name)}")
        if c.is_reg:
            lines.append("  is_reg = true")
        lines.append("")
    return "\n".join(lines)


# --- dreambooth extension concepts JSON ---------------------------------------------------------------------

def from_dreambooth_json(text: str) -> list:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConceptError(f"not valid JSON ({e}); a trailing comma after the last concept is a common cause") from None
    if isinstance(data, dict):
        data = data.get("concepts_list", [data])
    concepts = []
    for entry in data:
        if not isinstance(entry, dict) or not entry.get("instance_data_dir"):
            raise ConceptError("each concept needs an instance_data_dir")
        concepts.append(Concept(entry["instance_data_dir"], 1, entry.get("instance_token", "")))
        if entry.get("class_data_dir"):
            concepts.append(Concept(entry["class_data_dir"], 1, entry.get("class_token", ""), is_reg=True))
    return concepts


def to_dreambooth_json(concepts: list) -> str:
    """Each train concept with the regularization concept right after it (if any) as its class folder."""
    out = []
    for i, c in enumerate(concepts):
        if c.is_reg:
            continue
        entry = {"instance_data_dir": c.folder, "instance_token": c.name, "instance_prompt": "[filewords]"}
        nxt = concepts[i + 1] if i + 1 < len(concepts) else None
        if nxt is not None and nxt.is_reg:
            entry.update(class_data_dir=nxt.folder, class_token=nxt.name, class_prompt="[filewords]")
        out.append(entry)
    return json.dumps(out, indent=2)


# --- folders ----------------------------------------------------------------------------------------------

def images_with_captions(folder: str, caption_extension: str = ".txt") -> list:
    """[(image path, caption file path or None)] of a folder, sorted."""
    out = []
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXT:
            cap = os.path.join(folder, stem + caption_extension)
            out.append((os.path.join(folder, name), cap if os.path.isfile(cap) else None))
    return out


def prepare(concepts: list, dest: str, mode: str = "link") -> dict:
    """Lays the concepts out under `dest` as train/N_name and reg/N_name, linking (hard links, or copies
    where the system refuses them: another disk) or copying each image and its caption. `dest` must be new or empty;
    originals are only read. Returns {"train": dir, "reg": dir or None, "files": n, "copied_instead_of_linked": n}."""
    if mode not in ("link", "copy"):
        raise ConceptError(f"mode {mode!r}: link or copy")
    if os.path.isdir(dest) and os.listdir(dest):
        raise ConceptError(f"{dest} is not empty; prepare into a new folder")
    for c in concepts:
        if not os.path.isdir(c.folder):
            raise ConceptError(f"{c.folder}: no such folder")
        source, target = os.path.realpath(c.folder), os.path.realpath(dest)
        if os.path.commonpath([source, target]) in (source, target):
            raise ConceptError(f"{dest} is inside (or holds) the concept folder {c.folder}, an input; prepare "
                               "into a folder of its own")
    train, reg = os.path.join(dest, "train"), os.path.join(dest, "reg")
    used, files, fallback = set(), 0, 0
    for c in concepts:
        target = os.path.join(reg if c.is_reg else train, f"{int(c.repeats)}_{c.label}")
        while target in used:
            target += "_"
        used.add(target)
        os.makedirs(target)
        for image, caption in images_with_captions(c.folder, c.caption_extension):
            for src in (image, caption):
                if src is None:
                    continue
                dst = os.path.join(target, os.path.basename(src))
                if mode == "link":
                    try:        # a hard link: the dataset's scan follows no symbolic link out of a concept folder
                        os.link(src, dst)
                    except OSError:
                        shutil.copy2(src, dst)
                        fallback += 1
                else:
                    shutil.copy2(src, dst)
                files += 1
    return {"train": train, "reg": reg if any(c.is_reg for c in concepts) else None, "files": files,
            "copied_instead_of_linked": fallback}


def write_caption(image_path: str, text: str, caption_extension: str = ".txt") -> str:
    """Saves an image's caption (atomically); returns the caption file's path."""
    from .atomic import atomic_write

    path = os.path.splitext(image_path)[0] + caption_extension
    atomic_write(path, text.strip().encode("utf-8"), overwrite=True)
    return path


def read_caption(caption_path: str | None) -> str:
    """A caption as training reads it (UTF-8 or UTF-16), so that what the editor shows and saves is that."""
    from .train.dataset import decode_caption

    if caption_path is None:
        return ""
    with open(caption_path, "rb") as f:
        return decode_caption(f.read())[0].strip()


def caption_missing(folder: str, caption_extension: str, caption_fn) -> dict:
    """Writes a caption for each image of `folder` that has none, from `caption_fn(PIL image)`; existing
    captions are never touched. {"written": [caption paths], "kept": n already captioned}."""
    from PIL import Image

    written, kept = [], 0
    for image, caption in images_with_captions(folder, caption_extension):
        if caption is not None:
            kept += 1
            continue
        with Image.open(image) as im:
            text = caption_fn(im.convert("RGB"))
        written.append(write_caption(image, str(text), caption_extension))
    return {"written": written, "kept": kept}


def to_rows(concepts: list) -> list:
    return [[c.folder, c.repeats, c.name, c.caption_extension, c.is_reg] for c in concepts]


def from_rows(rows: list) -> list:
    concepts = []
    for row in rows:
        if not row or not str(row[0]).strip():
            continue
        folder, repeats, name, ext, is_reg = (list(row) + [1, "", ".txt", False])[:5]
        try:
            value = float(repeats if repeats not in (None, "") else 1)
            if value != int(value) or not 1 <= value <= 10000:
                raise ValueError
            repeats = int(value)
        except (ValueError, OverflowError):
            raise ConceptError(f"{folder}: repeats must be a whole number from 1 to 10000, not {repeats!r}") from None
        concepts.append(Concept(str(folder).strip(), repeats, str(name or ""), str(ext or ".txt"),
                                str(is_reg).lower() in ("true", "1", "yes")))
    return concepts

