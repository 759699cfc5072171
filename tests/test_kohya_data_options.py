"""kohya's data options beside the folders: caption_dropout_every_n_epochs, token warm-up, resize_interpolation
(and kohya's default filter: area to shrink, lanczos to enlarge), color_aug, sample_at_first."""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_model
from lora_ext.train import batches, dataset
from lora_ext.train.config import ConfigError, from_dict


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from lora_ext.sample_data import make_sample_dataset
    return make_sample_dataset(str(tmp_path_factory.mktemp("data")), size=96, per_concept=2)


def test_caption_dropout_every_n_epochs_drops_every_caption_of_those_epochs(data):
    cfg = from_dict({"train_data_dir": data["train"], "caption_dropout_every_n_epochs": 2, "caption_extension": ".txt"})
    scan = dataset.scan(cfg.train_data_dir, None, ".txt", dataset.Layout.of(cfg))
    aug = batches.Augment(caption=cfg)
    for epoch in range(4):
        captions = [batches.caption_of(s, aug) for b in batches.run_plan(scan, 1, 0, epoch) for s in b]
        # kohya counts epochs from 1: its 2nd and 4th epochs, our 1 and 3, train without captions
        assert (set(captions) == {""}) == (epoch % 2 == 1), epoch
    with pytest.raises(ConfigError, match="cache_text_encoder_outputs keeps one encoding"):
        from_dict({"caption_dropout_every_n_epochs": 2, "cache_text_encoder_outputs": True,
                   "network_train_unet_only": True})


def _sample(tmp_path, size, bucket, **options):
    path = str(tmp_path / f"img{size[0]}x{size[1]}.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    cfg = from_dict(options)
    item = dataset.Item(path, "c", True, size, "c", 1, options=cfg)
    return batches.Sample(item, bucket, seed=1), path


@pytest.mark.parametrize("size,bucket,given,pil", [
    ((200, 150), (64, 64), "", Image.BOX),             # kohya's default when shrinking: area
    ((40, 30), (64, 64), "", Image.LANCZOS),           # and when enlarging: lanczos
    ((200, 150), (64, 64), "nearest", Image.NEAREST),
    ((200, 150), (64, 64), "bicubic", Image.BICUBIC),
])
def test_resize_interpolation_is_the_filter_kohya_names(tmp_path, size, bucket, given, pil):
    sample, path = _sample(tmp_path, size, bucket, resize_interpolation=given)
    got = batches.pixels(sample, batches.Augment(), flip=False)
    (rw, rh), box = dataset.crop_box(size, bucket, None)
    want = np.asarray(Image.open(path).convert("RGB").resize((rw, rh), pil).crop(box), dtype=np.float32)
    assert torch.equal(got, torch.from_numpy(want).permute(2, 0, 1) / 127.5 - 1.0)
    with pytest.raises(ConfigError, match="resize_interpolation 'sinc'"):
        from_dict({"resize_interpolation": "sinc"})


def test_cached_latents_are_kept_apart_by_resize_filter(tmp_path):
    calls = []

    def encode(px):
        calls.append(1)
        return torch.zeros(px.shape[0], 4, px.shape[2] // 8, px.shape[3] // 8)
    cache = batches.LatentCache(encode)
    a, _ = _sample(tmp_path, (200, 150), (64, 64), resize_interpolation="nearest")
    b, _ = _sample(tmp_path, (200, 150), (64, 64), resize_interpolation="bicubic")
    cache.get(a, batches.Augment(), False)
    cache.get(b, batches.Augment(), False)
    cache.get(a, batches.Augment(), False)
    assert len(calls) == 2


def test_sample_at_first_draws_previews_before_the_first_step(data, tmp_path):
    from lora_ext.hosts.webui import WebuiHost
    from lora_ext.train.loop import train

    cfg = from_dict({"train_data_dir": data["train"], "resolution": "64", "network_dim": 2, "max_train_steps": 1,
                     "sample_prompts": ["a red circle --w 64 --h 64 --s 2"], "sample_at_first": True,
                     "output_dir": str(tmp_path), "output_name": "first"})
    events = []
    train(WebuiHost(tiny_model("sd1")), cfg, on_event=events.append)
    kinds = [(e.kind, e.step) for e in events if e.kind in ("sample", "step")]
    assert kinds[0] == ("sample", 0) and ("step", 1) in kinds
    assert os.path.isfile(next(e for e in events if e.kind == "sample").paths[0])


class _Scripted:
    """A random source giving these draws in order (random() and uniform() alike)."""
    def __init__(self, *draws):
        self.draws = list(draws)

    def random(self):
        return self.draws.pop(0)

    def uniform(self, lo, hi):
        return self.draws.pop(0)


def test_color_aug_is_kohyas_hue_turn_or_raw_gamma():
    import colorsys

    from lora_ext.train import color_aug

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert color_aug.apply(image, _Scripted(0.5)) is image              # two thirds of the draws: unchanged
    gamma = color_aug.apply(image, _Scripted(0.1, 0.2, 1.04))           # x ** 1.04 on 0-255, cut
    assert np.array_equal(gamma, np.clip(image.astype(np.float64) ** 1.04, 0, 255).astype(np.uint8))
    turned = color_aug.apply(image, _Scripted(0.1, 0.9, -5.0))          # hue -5 of 180 steps: 175
    for (y, x) in ((0, 0), (3, 7), (15, 15), (8, 2)):
        h, s, v = colorsys.rgb_to_hsv(*(image[y, x] / 255))
        want = np.array(colorsys.hsv_to_rgb((h - 10 / 360) % 1, s, v)) * 255
        assert np.abs(turned[y, x] - want).max() <= 4, (image[y, x], turned[y, x], want)
    with pytest.raises(ConfigError, match="color_aug needs the VAE at every step"):
        from_dict({"color_aug": True, "cache_latents": True})


@pytest.mark.parametrize("given,total", [(10, 40), (0.25, 40)])
def test_token_warmup_keeps_more_tags_as_kohya_counts_them(given, total):
    """kohya's process_caption: before step W (below 1: W x the run's steps) only the first
    floor(step x (tags - min) / W) + min of the tags that move are kept; the kept-in-place ones always."""
    import random

    from lora_ext.train.captions import process

    cfg = from_dict({"token_warmup_min": 2, "token_warmup_step": given, "keep_tokens": 1})
    caption = "trigger, a, b, c, d, e, f"
    warm = 10
    for step in (0, 3, 7, 9, 10, 30):
        kept = caption.split(", ")[1:]
        if step < warm:
            kept = kept[:math.floor(step * (len(kept) - 2) / warm) + 2]
        assert process(caption, random.Random(0), cfg, step=step, total=total) == ", ".join(["trigger"] + kept), step
    with pytest.raises(ConfigError, match="token_warmup_step"):
        from_dict({"token_warmup_step": 10, "cache_text_encoder_outputs": True, "network_train_unet_only": True})
