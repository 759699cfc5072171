"""From a scanned dataset to batches: which images, in which order, at which size, with which caption, as
pixels or cached latents. Everything random here is derived from (seed, epoch, position), so an epoch is the
same whether a run goes straight through it or resumes in its middle."""
from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field

import torch

from ..hosts.conditioning import Size
from .captions import process
from .config import RESIZE_FILTERS, TrainConfig
from .dataset import Item, Layout, crop_box, load_image


@dataclass(frozen=True)
class Sample:
    item: Item
    bucket: tuple
    seed: int           # this sample's augmentation seed
    resized: tuple | None = None    # the size the image is resized to before the crop; None: to cover the bucket
    epoch: int = 0                  # the epoch it is drawn in (kohya's caption dropout every n epochs)


def _rng(*parts) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little"))


def epoch_plan(items_train, items_reg, layout: Layout, batch_size: int, seed: int, epoch: int) -> list:
    """Batches (lists of Sample) of one epoch. Each train image appears `repeats` times; regularization
    images, if any, fill as many places again (cycled, each weighted by its repeats). A batch holds images
    of one bucket of the `layout`; the batch order is shuffled."""
    entries = [i for i in items_train for _ in range(i.repeats)]
    if items_reg:
        pool = [i for i in items_reg for _ in range(i.repeats)]
        entries += [pool[k % len(pool)] for k in range(len(entries))]
    rng = _rng("order", seed, epoch)
    rng.shuffle(entries)
    by_bucket: dict = {}
    for pos, item in enumerate(entries):
        bucket, resized = layout.place(item.size)
        by_bucket.setdefault(bucket, []).append(Sample(item, bucket, rng.getrandbits(62) ^ pos, resized, epoch))
    batches = [samples[k:k + batch_size] for _, samples in sorted(by_bucket.items())
               for k in range(0, len(samples), batch_size)]
    rng.shuffle(batches)
    return batches


def run_plan(scan, batch_scale: int, seed: int, epoch: int) -> list:
    """The batches of one epoch of every Layout (kohya: every [[datasets]]) of the scan, each at its batch
    size times `batch_scale`, in one shuffled order (one Layout: its own order)."""
    plans = [epoch_plan([i for i in scan.train_items if i.group == g], [i for i in scan.reg_items if i.group == g],
                        layout, layout.batch_size * batch_scale, seed, epoch)
             for g, layout in enumerate(scan.layouts)]
    if len(plans) == 1:
        return plans[0]
    out = [b for plan in plans for b in plan]
    _rng("datasets", seed, epoch).shuffle(out)
    return out


@dataclass(frozen=True)
class Augment:
    flip: bool = False
    random_crop: bool = False
    caption: TrainConfig = field(default_factory=TrainConfig)     # the caption options (train.captions)


def _options(sample: Sample, aug: Augment):
    """The caption and augmentation options of the sample's subset, or the run's."""
    return sample.item.options if sample.item.options is not None else aug.caption


def caption_of(sample: Sample, aug: Augment, step: int = 0, total: int = 0) -> str:
    """`step`, `total`: the optimizer steps done and the run's (kohya's token warm-up)."""
    return process(sample.item.caption, _rng("caption", sample.seed), _options(sample, aug), sample.epoch, step, total)


def flipped(sample: Sample, aug: Augment) -> bool:
    flip = sample.item.options.flip_aug if sample.item.options is not None else aug.flip
    return flip and _rng("flip", sample.seed).random() < 0.5


def _crop(sample: Sample, aug: Augment):
    crop = sample.item.options.random_crop if sample.item.options is not None else aug.random_crop
    rng = _rng("crop", sample.seed) if crop else None
    return crop_box(sample.item.size, sample.bucket, rng, sample.resized)


def size_of(sample: Sample, aug: Augment, flip: bool) -> Size:
    """SDXL's size conditioning as kohya records it: the image's original (h, w), the crop's top-left in
    the resized image (mirrored when the image is flipped), the bucket's (h, w)."""
    (rw, _), (left, top, right, _) = _crop(sample, aug)
    w, h = sample.item.size
    bw, bh = sample.bucket
    return Size((h, w), (top, rw - right if flip else left), (bh, bw))


def resize_filter(sample: Sample, aug: Augment) -> str:
    """The resize_interpolation of the sample's subset (or the run's); kohya's default: area when the image
    shrinks on both sides, else lanczos."""
    name = (_options(sample, aug).resize_interpolation or "").lower()
    if name:
        return name
    (rw, rh), _ = _crop(sample, aug)
    w, h = sample.item.size
    return "area" if w >= rw and h >= rh else "lanczos"


def pixels(sample: Sample, aug: Augment, flip: bool | None = None) -> torch.Tensor:
    """The sample's image as a [3, h, w] tensor in [-1, 1], resized to cover its bucket and cropped."""
    import numpy as np
    from PIL import Image

    image, _ = load_image(sample.item.path)
    resized, box = _crop(sample, aug)
    image = image.resize(resized, getattr(Image, RESIZE_FILTERS[resize_filter(sample, aug)])).crop(box)
    if flipped(sample, aug) if flip is None else flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels8 = np.asarray(image)
    if _options(sample, aug).color_aug:
        from . import color_aug
        pixels8 = color_aug.apply(pixels8, _rng("color", sample.seed))
    arr = torch.from_numpy(pixels8.astype(np.float32)).permute(2, 0, 1)
    return arr / 127.5 - 1.0


class LatentCache:
    """Latents of (image, bucket, flip), in memory and optionally on disk: beside the images (`<image>.<w>x<h>
    .lora_ext-latents`, safetensors inside) or in a cache folder. A disk entry records the image's mtime and
    size and what made it (`precision`: the VAE's fingerprint, the latent scale, the encode's precision); a
    changed image, another bucket (resolution), model or precision is encoded again, and so is an entry whose
    latent does not have the bucket's shape. Only valid without random crops."""

    def __init__(self, encode, to_disk: bool = False, folder: str | None = None, precision: str = ""):
        self.encode = encode            # pixels [b, 3, h, w] -> latents
        self.to_disk, self.folder, self.precision = to_disk, folder, precision
        self.memory: dict = {}
        self.encoded = 0

    def keys(self) -> set:
        """(image path, bucket) of the latents held."""
        return {(path, bucket) for path, bucket, *_ in self.memory}

    def _file(self, item: Item, bucket, flip, how: str) -> str:
        name = f"{os.path.basename(item.path)}.{bucket[0]}x{bucket[1]}{'.flip' if flip else ''}.{how}.lora_ext-latents"
        if self.folder:
            digest = hashlib.sha256(os.path.abspath(item.path).encode()).hexdigest()[:16]
            return os.path.join(self.folder, f"{digest}-{name}")
        return os.path.join(os.path.dirname(item.path), name)

    def get(self, sample: Sample, aug: Augment, flip: bool) -> torch.Tensor:
        item = sample.item
        st = os.stat(item.path)
        stamp = (st.st_mtime_ns, st.st_size)
        # how the image became the bucket's pixels besides the bucket: the resize filter, the resized size
        how = resize_filter(sample, aug) + ("" if sample.resized is None else f"-{sample.resized[0]}x{sample.resized[1]}")
        key = (item.path, sample.bucket, flip, how)
        hit = self.memory.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        latent = self._load(item, sample.bucket, flip, how, stamp) if self.to_disk else None
        if latent is None:
            with torch.no_grad():
                latent = self.encode(pixels(sample, aug, flip)[None])[0].float().cpu()
            self.encoded += 1
            if self.to_disk:
                self._save(item, sample.bucket, flip, how, stamp, latent)
        self.memory[key] = (stamp, latent)
        return latent

    def _load(self, item, bucket, flip, how, stamp):
        # safetensors, never torch.load: inside the webui torch.load is its own checker, which may refuse
        # what this torch wrote and hand back None
        from safetensors import safe_open

        path = self._file(item, bucket, flip, how)
        if not os.path.exists(path):
            return None
        try:
            with safe_open(path, framework="pt") as f:
                if (f.metadata() or {}).get("stamp") != self._stamp_text(stamp):
                    return None
                latent = f.get_tensor("latent")
        except Exception:
            return None
        fits = latent.ndim == 3 and tuple(latent.shape[1:]) == (bucket[1] // 8, bucket[0] // 8)
        return latent.float() if fits and bool(torch.isfinite(latent).all()) else None

    def _save(self, item, bucket, flip, how, stamp, latent) -> None:
        from safetensors.torch import save

        from ..atomic import atomic_write

        path = self._file(item, bucket, flip, how)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, save({"latent": latent.contiguous()}, {"stamp": self._stamp_text(stamp)}), overwrite=True)

    def _stamp_text(self, stamp) -> str:
        return f"{stamp[0]}:{stamp[1]}" + (f":{self.precision}" if self.precision else "")
