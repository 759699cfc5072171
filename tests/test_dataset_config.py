"""kohya's dataset TOML (--dataset_config): its examples run unchanged, the fallback of values from subset to
dataset to [general] to the command line, the same images, repeats, captions and buckets as our concept
folders, several datasets of their own sizes and batches, bucket_no_upscale, and every problem of a file in
one message."""
import json
import math
import os
import random

import pytest
from PIL import Image

from conftest import tiny_model
from lora_ext.train import batches, dataset, dataset_config
from lora_ext.train.config import ConfigError, from_dict


def _images(folder, sizes, captions=None):
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(len(sizes))
    for i, size in enumerate(sizes):
        Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3))).save(os.path.join(folder, f"{i:02d}.png"))
        if captions and captions[i] is not None:
            with open(os.path.join(folder, f"{i:02d}.txt"), "w", encoding="utf-8") as f:
                f.write(captions[i])
    return folder


def _toml(tmp_path, text, name="dataset.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# kohya's docs/config_README-en.md, "Example of configuration file: secondary_separator, wildcard notation,
# keep_tokens_separator, etc.", as printed there but for the image folder (and its comments)
DOC_EXAMPLE = '''
[general]
flip_aug = true
color_aug = false
resolution = [1024, 1024]

[[datasets]]
batch_size = 6
enable_bucket = true
bucket_no_upscale = true
caption_extension = ".txt"
keep_tokens_separator= "|||"
shuffle_caption = true
caption_tag_dropout_rate = 0.1
secondary_separator = ";;;"
enable_wildcard = true

  [[datasets.subsets]]
  image_dir = "{image_dir}"
  num_repeats = 1
  caption_prefix = "1girl, hatsune miku, vocaloid |||"
  caption_suffix = ", anime screencap ||| masterpiece, rating: general"
'''


def test_the_documented_example_trains_unchanged_from_the_command_line(tmp_path):
    from test_train import _cli

    from lora_ext import files

    folder = _images(str(tmp_path / "image_dir"), [(96, 64), (64, 96), (80, 80)],
                     ["upper body, sky;;;cloud;;;day, {simple|white} background", "smile\nsecond line", None])
    config = _toml(tmp_path, DOC_EXAMPLE.format(image_dir=folder.replace("\\", "/")))
    out = _cli("train", "--pretrained_model_name_or_path", "tiny-sd1", "--dataset_config", config,
               "--output_dir", "out", "--output_name", "doc", "--max_train_steps", "2", "--network_dim", "2",
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout[out.stdout.index("{"):])["steps"] == 2
    meta = files.read(str(tmp_path / "out" / "doc.safetensors")).metadata
    # the run-wide summary kohya's ss_* keys give: the datasets' resolution and batch, flip on
    assert (meta["ss_resolution"], meta["ss_batch_size_per_device"], meta["ss_flip_aug"]) == ("(1024, 1024)", "6", "True")


def test_the_documented_example_reads_as_kohya_describes_it(tmp_path):
    folder = _images(str(tmp_path / "image_dir"), [(96, 64), (2000, 1000)],
                     ["upper body, sky;;;cloud;;;day, {simple|white} background", None])
    cfg = from_dict({"dataset_config": _toml(tmp_path, DOC_EXAMPLE.format(image_dir=folder))})
    scan = dataset_config.scan_run(cfg)
    layout, = scan.layouts
    assert (layout.size, layout.batch_size, layout.enable_bucket, layout.bucket_no_upscale) == ((1024, 1024), 6, True, True)
    item = next(i for i in scan.items if i.captioned)
    o = item.options
    assert (o.flip_aug, o.shuffle_caption, o.caption_tag_dropout_rate, o.keep_tokens_separator, o.caption_extension) \
        == (True, True, 0.1, "|||", ".txt")
    # kept tags first and last, the rest shuffled and dropped, ;;; turned into the separator, one wildcard
    plan = batches.run_plan(scan, 1, seed=0, epoch=0)
    captions = {batches.caption_of(s, batches.Augment()) for _ in range(3) for b in plan for s in b
                if s.item is item}
    for c in captions:
        assert c.startswith("1girl, hatsune miku, vocaloid") and c.endswith("masterpiece, rating: general")
        assert "sky,cloud,day" in c and ("simple background" in c or "white background" in c or c.count(",") < 8)
    # no upscale: the small image keeps its size (cut to 64-multiples), the large one comes down to 1024x1024's area
    buckets = {os.path.basename(s.item.path): s.bucket for b in plan for s in b}
    assert buckets["00.png"] == (64, 64)
    w, h = buckets["01.png"]
    assert w * h <= 1024 * 1024 and abs(w / h - 2) < 0.1


def test_values_fall_back_from_subset_to_dataset_to_general_to_the_command_line(tmp_path):
    """kohya's first example (its DreamBooth dataset): keep_tokens 2 from the dataset, 3 from the subset,
    1 for the regularization subset; shuffle_caption and the caption extension from [general]."""
    hoge, fuga, reg = (_images(str(tmp_path / n), [(64, 64)]) for n in ("hoge", "fuga", "reg"))
    config = _toml(tmp_path, f'''
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{hoge}'
  class_tokens = 'hoge girl'

  [[datasets.subsets]]
  image_dir = '{fuga}'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{reg}'
  class_tokens = 'human'
  keep_tokens = 1
''')
    cfg = from_dict({"dataset_config": config, "flip_aug": True, "caption_prefix": "cli"})
    scan = dataset_config.scan_run(cfg)
    got = {os.path.basename(os.path.dirname(i.path)): (i.options.keep_tokens, i.options.shuffle_caption,
                                                       i.options.caption_extension, i.caption, i.is_reg,
                                                       i.options.flip_aug, i.options.caption_prefix)
           for i in scan.items}
    assert got == {"hoge": (2, True, ".txt", "hoge girl", False, True, "cli"),
                   "fuga": (3, True, ".txt", "fuga boy", False, True, "cli"),
                   "reg": (1, True, ".txt", "human", True, True, "cli")}
    assert (scan.layouts[0].size, scan.layouts[0].batch_size) == ((512, 512), 4)


def test_a_dataset_toml_gives_what_the_concept_folders_give(tmp_path):
    """The sample dataset's N_name folders, and a TOML naming the same folders with those repeats and
    names as class tokens: the same images, repeats, captions and buckets, batch for batch."""
    from lora_ext.sample_data import make_sample_dataset

    data = make_sample_dataset(str(tmp_path / "data"), size=64)
    options = {"resolution": "64", "enable_bucket": True, "min_bucket_reso": 64, "max_bucket_reso": 128,
               "bucket_reso_steps": 32, "caption_extension": ".txt", "shuffle_caption": True, "keep_tokens": 1,
               "train_batch_size": 2, "flip_aug": True}
    from_folders = from_dict({"train_data_dir": data["train"], "reg_data_dir": data["reg"], **options})
    subsets = "".join(
        f'''
  [[datasets.subsets]]
  image_dir = "{os.path.join(root, name)}"
  num_repeats = {name.split("_")[0]}
  class_tokens = "{name.split("_", 1)[1]}"
  is_reg = {str(root == data["reg"]).lower()}
''' for root in (data["train"], data["reg"]) for name in sorted(os.listdir(root)))
    from_toml = from_dict({"dataset_config": _toml(tmp_path, "[[datasets]]\n" + subsets), **options})
    a, b = dataset_config.scan_run(from_folders), dataset_config.scan_run(from_toml)
    assert len(a.items) == len(b.items) == 10

    def epoch(scan, cfg, n):
        aug = batches.Augment(cfg.flip_aug, cfg.random_crop, cfg)
        return [[(s.item.path, s.item.repeats, s.bucket, batches.caption_of(s, aug), batches.flipped(s, aug))
                 for s in batch] for batch in batches.run_plan(scan, 1, 7, n)]
    for n in range(2):
        assert epoch(a, from_folders, n) == epoch(b, from_toml, n)
    assert dataset.report(a, 75)["buckets"] == dataset.report(b, 75)["buckets"]


def test_several_datasets_keep_their_own_resolution_and_batch(tmp_path):
    """kohya's "same folder in two datasets" example: both are trained, each at its size and batch size."""
    folder = _images(str(tmp_path / "hoge"), [(64, 64)] * 5)
    config = _toml(tmp_path, f'''
[[datasets]]
resolution = 64
batch_size = 2
  [[datasets.subsets]]
  image_dir = '{folder}'

[[datasets]]
resolution = 128
batch_size = 3
  [[datasets.subsets]]
  image_dir = '{folder}'
''')
    cfg = from_dict({"dataset_config": config, "caption_extension": ".txt"})
    scan = dataset_config.scan_run(cfg)
    plan = batches.run_plan(scan, 1, 0, 0)
    shapes = sorted((b[0].bucket, len(b)) for b in plan)
    assert shapes == [((64, 64), 1), ((64, 64), 2), ((64, 64), 2), ((128, 128), 2), ((128, 128), 3)]
    assert all(len({s.bucket for s in b}) == 1 for b in plan)
    assert [b[0].bucket for b in plan] != sorted(b[0].bucket for b in plan) or len(plan) < 3   # interleaved
    wide = dataset_config.widest(cfg)
    assert (wide.size, wide.train_batch_size) == ((128, 128), 3)
    # a run of it (the loop's batch share reads each batch's own dataset)
    from lora_ext.hosts.webui import WebuiHost
    from lora_ext.train.loop import train

    run_cfg = from_dict({"dataset_config": config, "caption_extension": ".txt", "max_train_steps": 5,
                         "network_dim": 2, "output_dir": str(tmp_path / "o"), "output_name": "two"})
    result = train(WebuiHost(tiny_model("sd1")), run_cfg)
    assert result.steps == 5 and all(math.isfinite(x) for x in result.losses)


def _kohya_no_upscale(w, h, max_area, steps):
    """kohya's BucketManager.select_bucket with no_upscale (train_util), written from its description: an
    image over the area is scaled to it, its width or height (the one keeping the aspect ratio better)
    rounded to the steps; the bucket is the image's size cut down to the steps."""
    def rounded(x):
        x = int(x + 0.5)
        return x - x % steps
    ar = w / h
    if w * h > max_area:
        rw = math.sqrt(max_area * ar)
        rh = max_area / rw
        bw = rounded(rw)
        bh_for_w = rounded(bw / ar)
        bh = rounded(rh)
        bw_for_h = rounded(bh * ar)
        if abs(bw / bh_for_w - ar) < abs(bw_for_h / bh - ar):
            size = (bw, int(bw / ar + 0.5))
        else:
            size = (int(bh * ar + 0.5), bh)
    else:
        size = (w, h)
    return (size[0] - size[0] % steps, size[1] - size[1] % steps), size


def test_bucket_no_upscale_is_kohyas_formula():
    rng = random.Random(0)
    layout = dataset.Layout((512, 512), enable_bucket=True, bucket_no_upscale=True, bucket_reso_steps=64)
    for _ in range(2000):
        w, h = rng.randint(64, 3000), rng.randint(64, 3000)
        assert layout.place((w, h)) == _kohya_no_upscale(w, h, 512 * 512, 64), (w, h)
    # and the image is resized to kohya's size, then cut (centered) to the bucket
    bucket, resized = layout.place((3000, 1000))
    (rw, rh), box = dataset.crop_box((3000, 1000), bucket, None, resized)
    assert (rw, rh) == resized and (box[2] - box[0], box[3] - box[1]) == bucket


def test_kohyas_buckets_for_a_non_square_resolution():
    """kohya's make_bucket_resolutions: the area is width x height, and its square is a bucket."""
    buckets = dataset.make_buckets((768, 512), 256, 1024, 64)
    assert max(w * h for w, h in buckets) <= 768 * 512 and (576, 576) in buckets and (768, 512) in buckets


def test_every_problem_of_a_dataset_toml_in_one_message(tmp_path):
    folder = _images(str(tmp_path / "a"), [(64, 64)])
    config = _toml(tmp_path, f'''
[general]
shuffle_caption = "false"
colour_aug = true

[[datasets]]
batch_size = 0
resolution = [500, 512]
  [[datasets.subsets]]
  image_dir = '{folder}'
  face_crop_aug_range = [0.5, 1.0]
  caption_dropout_rate = 2
  [[datasets.subsets]]
  class_tokens = 'no folder'
  [[datasets.subsets]]
  image_dir = '{folder}'
  metadata_file = 'meta.json'
''')
    with pytest.raises(ConfigError) as e:
        from_dict({"dataset_config": config, "network_dim": -1})
    text = str(e.value)
    for part in ("network_dim", "shuffle_caption = 'false' is not true or false", "'colour_aug' is not an option",
                 "batch_size 0", "resolution 500x512", "face_crop_aug_range", "caption_dropout_rate",
                 "subset 2 has no image_dir", "fine-tuning subsets (metadata_file)"):
        assert part in text, part


@pytest.mark.parametrize("text,message", [
    (None, "no such file"),
    ("[[datasets]\n", "TOML"),
    ("[general]\nresolution = 512\n", "no [[datasets]]"),
    ("[[datasets]]\n  [[datasets.subsets]]\n  image_dir = 'nowhere'\n", None),
])
def test_hostile_dataset_tomls_get_one_clear_message(tmp_path, text, message):
    path = str(tmp_path / "d.toml") if text is None else _toml(tmp_path, text, "d.toml")
    if message is not None:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            from_dict({"dataset_config": path})
        return
    cfg = from_dict({"dataset_config": path})       # the file is well formed: the folder is checked with the data
    with pytest.raises(dataset.DatasetError, match="image_dir 'nowhere' does not exist"):
        dataset_config.scan_run(cfg)


def test_a_subset_with_no_repeats_is_left_out_and_said(tmp_path):
    a, b = _images(str(tmp_path / "a"), [(64, 64)]), _images(str(tmp_path / "b"), [(64, 64)])
    config = _toml(tmp_path, f"[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{a}'\n"
                             f"  [[datasets.subsets]]\n  image_dir = '{b}'\n  num_repeats = 0\n")
    scan = dataset_config.scan_run(from_dict({"dataset_config": config}))
    assert {os.path.dirname(i.path) for i in scan.items} == {a}
    assert any("left out: num_repeats 0" in w for w in scan.warnings)
