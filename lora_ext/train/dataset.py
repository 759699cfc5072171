"""Training data in kohya's folder convention, read once, checked up front.

A train folder holds concept folders named `N_name` (N repeats; the underscore is required). Each image may
have a caption file of the same name (`.txt` unless told otherwise); an image without one gets the concept's
name as caption. A regularization folder follows the same rules and may be empty. Every image is opened
while scanning, so a file that cannot be read is reported by name before training, never at step 500.
"""
from __future__ import annotations

import codecs
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_CONCEPT = re.compile(r"^(\d+)_(.+)$")
# What one folder or file may cost: an epoch lists each image once per repeat, and a caption is tokenized
# whole for the report (the encoders read at most 225 tokens of it).
MAX_REPEATS = 10000
MAX_SAMPLES_PER_EPOCH = 10_000_000
MAX_CAPTION_BYTES = 64 * 1024


class DatasetError(ValueError):
    """A dataset that cannot be trained on; the message says what to fix."""


@dataclass
class Item:
    path: str
    caption: str
    captioned: bool             # False when the caption is the concept name (no caption file)
    size: tuple                 # (width, height) after EXIF rotation
    concept: str
    repeats: int
    is_reg: bool = False


@dataclass
class Scan:
    items: list = field(default_factory=list)
    skipped: list = field(default_factory=list)     # (path, reason)
    warnings: list = field(default_factory=list)
    concepts: list = field(default_factory=list)    # (name, folder, repeats, is_reg, n_images, n_captions)

    @property
    def train_items(self) -> list:
        return [i for i in self.items if not i.is_reg]

    @property
    def reg_items(self) -> list:
        return [i for i in self.items if i.is_reg]

    def samples_per_epoch(self) -> int:
        """kohya's count: each train image `repeats` times; regularization images, if any, as many again."""
        n = sum(i.repeats for i in self.train_items)
        return n * 2 if self.reg_items else n


def load_image(path: str):
    """An RGB PIL image: EXIF orientation applied, transparency flattened onto white, CMYK / 16-bit /
    grayscale / palette converted. Returns (image, note or None)."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        im.load()
    note = None
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
        note = "transparency flattened onto white"
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray((arr / max(arr.max(), 1) * 255).astype("uint8"), "L")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im, note


def _read_caption(path: str) -> tuple[str, str | None]:
    with open(path, "rb") as f:
        raw = f.read(MAX_CAPTION_BYTES + 1)
    text, note = decode_caption(raw[:MAX_CAPTION_BYTES])
    if len(raw) > MAX_CAPTION_BYTES:
        note = (f"caption is longer than {MAX_CAPTION_BYTES // 1024} KiB; only its first {MAX_CAPTION_BYTES // 1024}"
                " KiB are read (the text encoders read at most 225 tokens)" + (f"; {note}" if note else ""))
    return text.strip().replace("\n", ", "), note


def decode_caption(raw: bytes) -> tuple[str, str | None]:
    """(text, note or None). UTF-8 (with or without BOM) or UTF-16 (Windows Notepad's "Unicode", with its
    BOM); other bytes are read as Windows-1252 and said so, never trained as mojibake unnoticed."""
    note = None
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = raw.decode("utf-16")
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("cp1252", errors="replace")
            note = "caption is not UTF-8 or UTF-16; read as Windows-1252: save it as UTF-8 if it looks wrong"
    return text.replace("\x00", "").replace("\r\n", "\n"), note


def scan(train_dir: str, reg_dir: str | None = None, caption_extension: str = ".txt") -> Scan:
    """Reads the folders. Raises DatasetError when there is nothing to train on."""
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    result = Scan()
    if not train_dir or not os.path.isdir(train_dir):
        raise DatasetError(f"train data folder {train_dir!r} does not exist")
    for root, is_reg in ((train_dir, False), (reg_dir, True)):
        if not root:
            continue
        if not os.path.isdir(root):
            raise DatasetError(f"regularization folder {root!r} does not exist")
        for name in sorted(os.listdir(root)):
            folder = os.path.join(root, name)
            if not os.path.isdir(folder):
                continue
            m = _CONCEPT.match(name)
            if not m:
                result.skipped.append((folder, "folder name is not N_name (N repeats, then an underscore)"))
                continue
            repeats, concept = int(m[1]), m[2]
            if repeats < 1:
                result.skipped.append((folder, "0 repeats: the folder would never be used"))
                continue
            if repeats > MAX_REPEATS:
                raise DatasetError(f"{folder}: {repeats} repeats; at most {MAX_REPEATS} (rename the folder, e.g. "
                                   f"'{min(repeats, 100)}_{concept}', or train more epochs)")
            _scan_concept(result, folder, concept, repeats, is_reg, caption_extension)
    if result.samples_per_epoch() > MAX_SAMPLES_PER_EPOCH:
        raise DatasetError(f"{train_dir}: {result.samples_per_epoch()} images an epoch (images times repeats); at "
                           f"most {MAX_SAMPLES_PER_EPOCH}: lower the folders' repeats and train more epochs")
    if not result.train_items:
        where = "".join(f"; skipped {p}: {r}" for p, r in result.skipped[:5])
        where += f" (and {len(result.skipped) - 5} more)" if len(result.skipped) > 5 else ""
        raise DatasetError(f"no trainable images in {train_dir}: it needs concept folders named like "
                           f"'10_mychar' holding images{where}")
    missing = sum(1 for i in result.items if not i.captioned)
    if missing:
        result.warnings.append(f"{missing} images have no {caption_extension} caption; their concept name is used")
    return result


def _within(path: str, real_folder: str) -> bool:
    """Whether `path`, links followed, stays inside `real_folder`: a link to a file elsewhere (a caption
    pointing at /etc/passwd) would be trained on and its text copied into the LoRA's shared metadata."""
    real = os.path.realpath(path)
    return os.path.commonpath([real, real_folder]) == real_folder


def _scan_concept(result: Scan, folder, concept, repeats, is_reg, caption_extension) -> None:
    n_images = n_captions = 0
    real_folder = os.path.realpath(folder)     # a concept folder that is itself a link is the user's choice
    for fname in sorted(os.listdir(folder)):
        path = os.path.join(folder, fname)
        stem, ext = os.path.splitext(fname)
        if ext.lower() not in IMAGE_EXT or not os.path.isfile(path):
            continue
        caption_path = os.path.join(folder, stem + caption_extension)
        captioned = os.path.isfile(caption_path)
        outside = [p for p in (path, caption_path if captioned else None) if p and not _within(p, real_folder)]
        if outside:
            result.skipped.append((path, f"{os.path.basename(outside[0])} is a link that leads out of its concept "
                                         f"folder: copy the file into {folder} if it is meant to be trained"))
            continue
        try:
            image, note = load_image(path)
        except Exception as e:      # PIL raises many kinds for damaged or unknown files
            result.skipped.append((path, f"cannot be read as an image ({type(e).__name__}: {e})"))
            continue
        if note:
            result.warnings.append(f"{path}: {note}")
        caption, caption_note = _read_caption(caption_path) if captioned else (concept, None)
        if caption_note:
            result.warnings.append(f"{caption_path}: {caption_note}")
        result.items.append(Item(path, caption, captioned, image.size, concept, repeats, is_reg))
        n_images += 1
        n_captions += captioned
    result.concepts.append((concept, folder, repeats, is_reg, n_images, n_captions))


# --- buckets ----------------------------------------------------------------------------------------------

def make_buckets(resolution: int, min_reso: int = 256, max_reso: int = 1024, step: int = 64) -> list:
    """Bucket sizes (w, h): multiples of `step` within [min, max] per side and at most resolution^2 pixels,
    the largest such h for every w (and the transposed sizes)."""
    max_area = resolution * resolution
    buckets = set()
    for w in range(min_reso, max_reso + 1, step):
        h = min(max_reso, (max_area // w) // step * step)
        if h >= min_reso:
            buckets.add((w, h))
            buckets.add((h, w))
    return sorted(buckets)


def assign_bucket(size: tuple, buckets: list) -> tuple:
    """The bucket whose aspect ratio is closest to the image's (ties: the larger bucket)."""
    w, h = size
    ratio = w / h
    return min(buckets, key=lambda b: (abs(b[0] / b[1] - ratio), -b[0] * b[1]))


def crop_box(size: tuple, bucket: tuple, rng: random.Random | None):
    """(resized size, crop box) to cover `bucket` with the image and cut it: centered, or random with `rng`."""
    w, h = size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    dx, dy = rw - bw, rh - bh
    x0 = rng.randint(0, dx) if rng and dx else dx // 2
    y0 = rng.randint(0, dy) if rng and dy else dy // 2
    return (rw, rh), (x0, y0, x0 + bw, y0 + bh)


# --- captions ---------------------------------------------------------------------------------------------

# --- the report shown before training --------------------------------------------------------------------

def report(result: Scan, resolution: int, buckets: list | None, max_token_length: int, count_tokens=None) -> dict:
    """Images and captions per concept, each concept's share of an epoch, missing captions, skipped files and
    why, the bucket histogram, the longest caption in tokens, tag frequency (what goes to ss_tag_frequency)."""
    total = result.samples_per_epoch()
    train_total = sum(i.repeats for i in result.train_items)
    concepts = []
    for name, folder, repeats, is_reg, n_images, n_captions in result.concepts:
        share = repeats * n_images / train_total if not is_reg and train_total else None
        concepts.append({"concept": name, "folder": folder, "repeats": repeats, "regularization": is_reg,
                         "images": n_images, "captions": n_captions, "missing_captions": n_images - n_captions,
                         "share_of_train": share})
    hist = Counter(assign_bucket(i.size, buckets) if buckets else (resolution, resolution) for i in result.items)
    tag_frequency = {}
    for name, folder, _, is_reg, *_ in result.concepts:
        freq = Counter(t.strip() for i in result.items if i.concept == name and i.is_reg == is_reg
                       for t in i.caption.split(",") if t.strip())
        tag_frequency[os.path.basename(folder)] = dict(freq)
    longest = None
    if count_tokens is not None and result.items:
        longest_item = max(result.items, key=lambda i: count_tokens(i.caption))
        longest = {"tokens": count_tokens(longest_item.caption), "file": longest_item.path,
                   "fits": count_tokens(longest_item.caption) <= max_token_length}
    errors = [] if result.train_items else ["no trainable images"]
    warnings = list(result.warnings)
    if longest and not longest["fits"]:
        warnings.append(f"the longest caption has {longest['tokens']} tokens, more than the max token length "
                        f"{max_token_length}: it will be cut (choose 150 or 225)")
    if result.reg_items and len(result.reg_items) < len(result.train_items):
        warnings.append(f"{len(result.reg_items)} regularization images for {len(result.train_items)} train "
                        "images: they will be repeated")
    return {"samples_per_epoch": total, "train_images": len(result.train_items),
            "reg_images": len(result.reg_items), "concepts": concepts,
            "skipped": [{"file": p, "reason": r} for p, r in result.skipped],
            "buckets": {f"{w}x{h}": n for (w, h), n in sorted(hist.items())}, "longest_caption": longest,
            "tag_frequency": tag_frequency, "warnings": warnings, "errors": errors}


NATIVE_RESOLUTION = {"sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": 1024}


def resolution_warnings(items: list, resolution: int, buckets: list | None, native: int | None, arch_name: str) -> list:
    """The comparison with the resolution the model was trained at (`native`; SDXL: 1024 px buckets), and
    how many images are smaller than the bucket they go to (they are upscaled: soft)."""
    out = []
    if native and resolution < native * 3 // 4:
        out.append(f"{arch_name.upper()} models were trained at {native} px; at {resolution} px the LoRA also "
                   f"learns the lower resolution (use {native}, with buckets for other aspect ratios)")
    def bucket(item):
        return assign_bucket(item.size, buckets) if buckets else (resolution, resolution)
    small = [i for i in items if i.size[0] < bucket(i)[0] or i.size[1] < bucket(i)[1]]
    if small:
        out.append(f"{len(small)} of {len(items)} images are smaller than their bucket and will be upscaled "
                   f"(e.g. {os.path.basename(small[0].path)}, {small[0].size[0]}x{small[0].size[1]})")
    return out
