"""Dataset rules (kohya's folders), image handling, buckets, batches, the report."""
import dataclasses
import os
import random

import numpy as np
import pytest
from PIL import Image

from lora_ext.train.captions import process
from lora_ext.train.config import TrainConfig
from lora_ext.train import batches, dataset
from lora_ext.train.dataset import DatasetError, Layout


def _img(path, size=(64, 48), mode="RGB", color=(200, 30, 30), **save):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color if mode in ("RGB", "RGBA", "CMYK") else 128).save(path, **save)


def test_the_guides_repeats_example(tmp_path):
    """2_HighRes with 20 images and 1_LowRes with 10 give 50 samples per epoch, 80% / 20%."""
    for i in range(20):
        _img(str(tmp_path / "2_HighRes" / f"{i}.png"))
    for i in range(10):
        _img(str(tmp_path / "1_LowRes" / f"{i}.jpg"))
    scan = dataset.scan(str(tmp_path))
    assert scan.samples_per_epoch() == 50
    rep = dataset.report(scan, 75)
    shares = {c["concept"]: c["share_of_train"] for c in rep["concepts"]}
    assert shares == {"HighRes": 0.8, "LowRes": 0.2}
    plan = batches.epoch_plan(scan.train_items, [], Layout((512, 512)), 1, seed=0, epoch=0)
    counts = {}
    for (s,) in plan:
        counts[s.item.concept] = counts.get(s.item.concept, 0) + 1
    assert counts == {"HighRes": 40, "LowRes": 10}


def test_captions_and_their_fallback(tmp_path):
    _img(str(tmp_path / "3_mychar" / "a.png"))
    (tmp_path / "3_mychar" / "a.txt").write_text("1girl, short hair\n", encoding="utf-8")
    _img(str(tmp_path / "3_mychar" / "b.png"))
    _img(str(tmp_path / "3_mychar" / "c.webp"))
    (tmp_path / "3_mychar" / "c.caption").write_text("other extension", encoding="utf-8")
    scan = dataset.scan(str(tmp_path))
    caps = {os.path.basename(i.path): (i.caption, i.captioned) for i in scan.items}
    assert caps == {"a.png": ("1girl, short hair", True), "b.png": ("mychar", False), "c.webp": ("mychar", False)}
    assert "2 images have no .txt caption" in scan.warnings[0]
    scan = dataset.scan(str(tmp_path), caption_extension="caption")
    assert {os.path.basename(i.path): i.caption for i in scan.items}["c.webp"] == "other extension"


def test_every_image_kind_and_every_bad_file(tmp_path):
    c = tmp_path / "train" / "1_stuff"
    _img(str(c / "plain.jpeg"))                                   # kohya skipped .jpeg; we don't
    _img(str(c / "b.bmp"))
    _img(str(c / "alpha.png"), mode="RGBA", color=(255, 0, 0, 0))
    _img(str(c / "cmyk.jpg"), mode="CMYK", color=(0, 255, 0, 0))
    _img(str(c / "gray.png"), mode="L")
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(str(c / "deep.png"))
    exif = Image.Exif()
    exif[0x0112] = 6                                               # rotated 90 degrees
    Image.new("RGB", (40, 20), (1, 2, 3)).save(str(c / "rotated.jpg"), exif=exif)
    (c / "empty.png").write_bytes(b"")
    (c / "text.png").write_text("not an image")
    _img(str(c / "trunc.png"), size=(64, 64))
    (c / "trunc.png").write_bytes((c / "trunc.png").read_bytes()[:60])
    (c / "notes.md").write_text("ignored: not an image extension")
    (tmp_path / "train" / "nounderscore").mkdir()
    (tmp_path / "train" / "0_never").mkdir()
    scan = dataset.scan(str(tmp_path / "train"))
    names = {os.path.basename(i.path): i for i in scan.items}
    assert set(names) == {"plain.jpeg", "b.bmp", "alpha.png", "cmyk.jpg", "gray.png", "deep.png", "rotated.jpg"}
    assert names["rotated.jpg"].size == (20, 40)
    skipped = {os.path.basename(p): r for p, r in scan.skipped}
    assert set(skipped) == {"empty.png", "text.png", "trunc.png", "nounderscore", "0_never"}
    assert "cannot be read as an image" in skipped["text.png"] and "N_name" in skipped["nounderscore"]
    assert any("transparency flattened onto white" in w for w in scan.warnings)
    for name in names:
        image, _ = dataset.load_image(names[name].path)
        assert image.mode == "RGB"
    assert dataset.load_image(names["alpha.png"].path)[0].getpixel((0, 0)) == (255, 255, 255)


def test_nothing_to_train_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        dataset.scan(str(tmp_path / "nope"))
    (tmp_path / "images").mkdir()
    _img(str(tmp_path / "images" / "a.png"))
    with pytest.raises(DatasetError, match="concept folders named like '10_mychar'"):
        dataset.scan(str(tmp_path))


def test_regularization_images_fill_as_many_places(tmp_path):
    for i in range(3):
        _img(str(tmp_path / "train" / "2_a" / f"{i}.png"))
    _img(str(tmp_path / "reg" / "1_person" / "r.png"))
    (tmp_path / "emptyreg").mkdir()
    scan = dataset.scan(str(tmp_path / "train"), str(tmp_path / "reg"))
    assert scan.samples_per_epoch() == 12
    plan = batches.epoch_plan(scan.train_items, scan.reg_items, Layout((512, 512)), 4, seed=1, epoch=0)
    flat = [s for b in plan for s in b]
    assert sum(s.item.is_reg for s in flat) == 6 and len(flat) == 12
    assert dataset.scan(str(tmp_path / "train"), str(tmp_path / "emptyreg")).samples_per_epoch() == 6


def test_buckets():
    buckets = dataset.make_buckets(512, 256, 1024, 64)
    assert all(w % 64 == 0 and h % 64 == 0 and 256 <= w <= 1024 and 256 <= h <= 1024 for w, h in buckets)
    assert all(w * h <= 512 * 512 for w, h in buckets)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    assert dataset.assign_bucket((1920, 1080), buckets) == (640, 384)       # 1.67 is the closest to 1.78
    assert dataset.assign_bucket((1000, 1000), buckets) == (512, 512)
    for size in ((1920, 1080), (300, 900), (513, 512)):
        b = dataset.assign_bucket(size, buckets)
        resized, box = dataset.crop_box(size, b, random.Random(0))
        assert resized[0] >= b[0] and resized[1] >= b[1]
        assert box[2] - box[0] == b[0] and box[3] - box[1] == b[1] and box[2] <= resized[0] and box[3] <= resized[1]


def test_batches_hold_one_bucket_and_epochs_are_reproducible(tmp_path):
    for i, size in enumerate([(64, 64), (128, 64), (64, 128), (128, 64), (64, 64)]):
        _img(str(tmp_path / "1_x" / f"{i}.png"), size=size)
    scan = dataset.scan(str(tmp_path))
    layout = Layout((64, 64), enable_bucket=True, min_bucket_reso=64, max_bucket_reso=128)
    plan = batches.epoch_plan(scan.train_items, [], layout, 2, seed=3, epoch=0)
    assert all(len({s.bucket for s in b}) == 1 for b in plan)
    assert plan == batches.epoch_plan(scan.train_items, [], layout, 2, seed=3, epoch=0)
    assert plan != batches.epoch_plan(scan.train_items, [], layout, 2, seed=3, epoch=1)
    aug = batches.Augment(flip=True, random_crop=True)
    s = plan[0][0]
    assert batches.pixels(s, aug).shape == (3, s.bucket[1], s.bucket[0])
    assert batches.pixels(s, aug).min() >= -1 and batches.pixels(s, aug).max() <= 1


def test_caption_shuffle_keeps_the_first_tokens_and_dropout_empties():
    rng = random.Random(0)
    cap = "mychar, red hair, smile, outdoors, night"
    outs = {process(cap, rng, TrainConfig(shuffle_caption=True, keep_tokens=1)) for _ in range(30)}
    assert len(outs) > 3 and all(o.startswith("mychar, ") for o in outs)
    assert all(sorted(o.split(", ")) == sorted(cap.split(", ")) for o in outs)
    assert process(cap, random.Random(0), TrainConfig(caption_dropout_rate=1.0)) == ""


def test_report(tmp_path):
    for i in range(2):
        _img(str(tmp_path / "4_cat" / f"{i}.png"), size=(96, 64))
        (tmp_path / "4_cat" / f"{i}.txt").write_text("cat, sitting" + (", long" * 40 if i else ""))
    scan = dataset.scan(str(tmp_path))
    rep = dataset.report(dataclasses.replace(scan, layouts=[Layout((64, 64), enable_bucket=True, min_bucket_reso=64, max_bucket_reso=128)]), 75, count_tokens=lambda t: len(t.split()))
    assert rep["samples_per_epoch"] == 8 and rep["tag_frequency"] == {"4_cat": {"cat": 2, "sitting": 2, "long": 40}}
    assert rep["longest_caption"]["tokens"] == 42 and rep["longest_caption"]["fits"] is True
    assert rep["buckets"] == {"64x64": 2}      # 64 px at most 64x64 area: the only bucket
    rep = dataset.report(scan, 75, count_tokens=lambda t: 100)
    assert any("more than the max token length" in w for w in rep["warnings"])


def test_latent_disk_cache_is_reused_until_the_image_bucket_or_precision_changes(tmp_path):
    import torch

    _img(str(tmp_path / "1_x" / "a.png"), size=(64, 64))
    scan = dataset.scan(str(tmp_path))
    calls = []

    def encode(px):
        calls.append(px.shape)
        return px[:, :, ::8, ::8].mean(1, keepdim=True).repeat(1, 4, 1, 1)

    aug = batches.Augment()
    s64 = batches.epoch_plan(scan.train_items, [], Layout((64, 64)), 1, 0, 0)[0][0]
    first = batches.LatentCache(encode, to_disk=True).get(s64, aug, False)
    again = batches.LatentCache(encode, to_disk=True).get(s64, aug, False)     # a new run: read from disk
    assert len(calls) == 1 and torch.equal(first, again)
    s128 = batches.epoch_plan(scan.train_items, [], Layout((128, 128)), 1, 0, 0)[0][0]
    batches.LatentCache(encode, to_disk=True).get(s128, aug, False)          # another resolution
    assert len(calls) == 2 and calls[-1][-1] == 128
    _img(str(tmp_path / "1_x" / "a.png"), size=(64, 64), color=(0, 200, 0))
    os.utime(tmp_path / "1_x" / "a.png", ns=(0, os.stat(tmp_path / "1_x" / "a.png").st_mtime_ns + 10 ** 9))
    changed = batches.LatentCache(encode, to_disk=True).get(s64, aug, False)
    assert len(calls) == 3 and not torch.equal(changed, first)
    batches.LatentCache(encode, to_disk=True, precision="bf16").get(s64, aug, False)  # encoded in another dtype
    batches.LatentCache(encode, to_disk=True, precision="bf16").get(s64, aug, False)
    assert len(calls) == 4
    folder = tmp_path / "cache"
    batches.LatentCache(encode, to_disk=True, folder=str(folder)).get(s64, aug, False)
    assert len(list(folder.iterdir())) == 1
