"""Training data in kohya's folder convention, read once, checked up front.

A train folder holds concept folders named `N_name` (N repeats; the underscore is required). Each image may
have a caption file of the same name (`.txt` unless told otherwise); an image without one gets the concept's
name as caption. A regularization folder follows the same rules and may be empty. Every image is opened
while scanning, so a file that cannot be read is reported by name before training, never at step 500.
"""
from __future__ import annotations

import codecs
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property

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
    group: int = 0              # which Layout of the Scan sizes and batches it (kohya: its [[datasets]])
    options: object = None      # its subset's caption and augmentation options (a TrainConfig); None: the run's


@dataclass(frozen=True)
class Layout:
    """How one kohya dataset sizes and batches its images: the resolution (w, h), the batch size and the
    buckets. A run from folders has one; a dataset TOML one per [[datasets]]."""
    size: tuple = (512, 512)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False

    @classmethod
    def of(cls, cfg) -> "Layout":
        """The run's own (a TrainConfig's options)."""
        return cls(cfg.size, cfg.train_batch_size, cfg.enable_bucket, cfg.min_bucket_reso, cfg.max_bucket_reso,
                   cfg.bucket_reso_steps, cfg.bucket_no_upscale)

    @cached_property
    def buckets(self) -> list | None:
        """The predefined bucket sizes; None without buckets or under bucket_no_upscale (sized per image)."""
        if not self.enable_bucket or self.bucket_no_upscale:
            return None
        return make_buckets(self.size, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps)

    def place(self, size: tuple) -> tuple:
        """(bucket, resized size or None) of an image of `size`: None means resized to cover the bucket."""
        if not self.enable_bucket:
            return self.size, None
        if self.bucket_no_upscale:
            return _no_upscale(size, self.size[0] * self.size[1], self.bucket_reso_steps)
        return assign_bucket(size, self.buckets), None


@dataclass
class Scan:
    items: list = field(default_factory=list)
    skipped: list = field(default_factory=list)     # (path, reason)
    warnings: list = field(default_factory=list)
    concepts: list = field(default_factory=list)    # (name, folder, repeats, is_reg, n_images, n_captions)
    layouts: list = field(default_factory=lambda: [Layout()])     # Item.group -> Layout

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
    # kohya keeps the lines (its first one is trained, or one of them with wildcards: train.captions)
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    return "\n".join(lines), note


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


def scan(train_dir: str, reg_dir: str | None = None, caption_extension: str = ".txt",
         layout: Layout | None = None) -> Scan:
    """Reads the folders. Raises DatasetError when there is nothing to train on."""
    caption_extension = dotted(caption_extension)
    result = Scan(layouts=[layout or Layout()])
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
            scan_concept(result, Source(folder, concept, repeats, is_reg, caption_extension, concept))
    return checked(result, train_dir, "it needs concept folders named like '10_mychar' holding images",
                   f"no {caption_extension} caption; their concept name is used")


def dotted(extension: str) -> str:
    return extension if extension.startswith(".") else "." + extension


def checked(result: Scan, where: str, hint: str, uncaptioned: str) -> Scan:
    """`result`, or DatasetError when it has nothing to train on or too much; the missing captions counted."""
    if result.samples_per_epoch() > MAX_SAMPLES_PER_EPOCH:
        raise DatasetError(f"{where}: {result.samples_per_epoch()} images an epoch (images times repeats); at "
                           f"most {MAX_SAMPLES_PER_EPOCH}: lower the repeats and train more epochs")
    if not result.train_items:
        skipped = "".join(f"; skipped {p}: {r}" for p, r in result.skipped[:5])
        skipped += f" (and {len(result.skipped) - 5} more)" if len(result.skipped) > 5 else ""
        raise DatasetError(f"no trainable images in {where}: {hint}{skipped}")
    missing = sum(1 for i in result.items if not i.captioned)
    if missing:
        result.warnings.append(f"{missing} images have {uncaptioned}")
    return result


def _within(path: str, real_folder: str) -> bool:
    """Whether `path`, links followed, stays inside `real_folder`: a link to a file elsewhere (a caption
    pointing at /etc/passwd) would be trained on and its text copied into the LoRA's shared metadata."""
    real = os.path.realpath(path)
    return os.path.commonpath([real, real_folder]) == real_folder


@dataclass
class Source:
    """One folder of images: a concept folder, or a subset of a dataset TOML."""
    folder: str
    concept: str                # its name in the report and the tag frequency
    repeats: int
    is_reg: bool
    caption_extension: str
    caption: str                # the caption of an image without a caption file
    group: int = 0
    options: object = None


def scan_concept(result: Scan, src: Source) -> None:
    folder, concept, caption_extension = src.folder, src.concept, src.caption_extension
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
        caption, caption_note = _read_caption(caption_path) if captioned else (src.caption, None)
        if caption_note:
            result.warnings.append(f"{caption_path}: {caption_note}")
        result.items.append(Item(path, caption, captioned, image.size, concept, src.repeats, src.is_reg, src.group,
                                 src.options))
        n_images += 1
        n_captions += captioned
    result.concepts.append((concept, folder, src.repeats, src.is_reg, n_images, n_captions))


# --- buckets ----------------------------------------------------------------------------------------------

def make_buckets(resolution, min_reso: int = 256, max_reso: int = 1024, step: int = 64) -> list:
    """Bucket sizes (w, h): multiples of `step` within [min, max] per side and at most w*h pixels of the
    `resolution` (w, h) or (r, r), the largest such h for every w (and the transposed sizes), and kohya's
    square of that area."""
    w, h = resolution if isinstance(resolution, tuple) else (resolution, resolution)
    max_area = w * h
    side = int(math.sqrt(max_area) // step) * step
    buckets = {(side, side)}
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


def _no_upscale(size: tuple, max_area: int, step: int) -> tuple:
    """kohya's bucket_no_upscale: (bucket, resized size) of an image of `size`. An image over `max_area`
    pixels is scaled down to it, its width or its height (whichever keeps the aspect ratio better) rounded to
    `step`; the bucket is the (resized) image cut down to multiples of `step`; nothing is scaled up."""
    w, h = size
    ratio = w / h
    if w * h > max_area:
        rw = math.sqrt(max_area * ratio)
        rh = max_area / rw

        def to_step(x):
            x = int(x + 0.5)
            return x - x % step
        by_w, by_h = to_step(rw), to_step(rh)
        err_w = abs(by_w / max(to_step(by_w / ratio), 1) - ratio)
        err_h = abs(to_step(by_h * ratio) / max(by_h, 1) - ratio)
        resized = (by_w, int(by_w / ratio + 0.5)) if err_w < err_h else (int(by_h * ratio + 0.5), by_h)
    else:
        resized = (w, h)
    bucket = (max(step, resized[0] - resized[0] % step), max(step, resized[1] - resized[1] % step))
    return bucket, resized


def crop_box(size: tuple, bucket: tuple, rng: random.Random | None, resized: tuple | None = None):
    """(resized size, crop box) to cover `bucket` with the image (or at `resized`, when given and covering)
    and cut it: centered, or random with `rng`."""
    w, h = size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if resized is not None and resized[0] >= bw and resized[1] >= bh:
        rw, rh = resized
    dx, dy = rw - bw, rh - bh
    x0 = rng.randint(0, dx) if rng and dx else dx // 2
    y0 = rng.randint(0, dy) if rng and dy else dy // 2
    return (rw, rh), (x0, y0, x0 + bw, y0 + bh)


# --- captions ---------------------------------------------------------------------------------------------

# --- the report shown before training --------------------------------------------------------------------

def bucket_of(result: Scan, item: Item) -> tuple:
    return result.layouts[item.group].place(item.size)[0]


def report(result: Scan, max_token_length: int, count_tokens=None) -> dict:
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
    hist = Counter(bucket_of(result, i) for i in result.items)
    tag_frequency = {}
    for name, folder, _, is_reg, *_ in result.concepts:
        freq = Counter(t.strip() for i in result.items if i.concept == name and i.is_reg == is_reg
                       for t in re.split(r"[,\n]", i.caption) if t.strip())
        tag_frequency[os.path.basename(folder)] = dict(freq)
    longest = None
    if count_tokens is not None and result.items:
        def tokens(item):       # the longest line: one line of a caption is trained at a time
            return max(count_tokens(line) for line in item.caption.split("\n"))
        longest_item = max(result.items, key=tokens)
        longest = {"tokens": tokens(longest_item), "file": longest_item.path,
                   "fits": tokens(longest_item) <= max_token_length}
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


def resolution_warnings(result: Scan, native: int | None, arch_name: str) -> list:
    """The comparison with the resolution the model was trained at (`native`; SDXL: 1024 px buckets), and
    how many images are smaller than the bucket they go to (they are upscaled: soft)."""
    out = []
    resolution = max(max(layout.size) for layout in result.layouts)
    if native and resolution < native * 3 // 4:
        out.append(f"{arch_name.upper()} models were trained at {native} px; at {resolution} px the LoRA also "
                   f"learns the lower resolution (use {native}, with buckets for other aspect ratios)")
    items = result.items
    small = [i for i in items if i.size[0] < bucket_of(result, i)[0] or i.size[1] < bucket_of(result, i)[1]]
    if small:
        out.append(f"{len(small)} of {len(items)} images are smaller than their bucket and will be upscaled "
                   f"(e.g. {os.path.basename(small[0].path)}, {small[0].size[0]}x{small[0].size[1]})")
    return out
