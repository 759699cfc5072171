"""The concept editor's core: kohya TOML and dreambooth JSON both ways, preparing N_name folders, captions."""
import os

import pytest
from PIL import Image

from lora_ext import concepts as cp
from lora_ext.train import dataset


def _folder(path, n, captions=True):
    os.makedirs(path, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (32, 32), (i * 20, 0, 0)).save(os.path.join(path, f"{i}.png"))
        if captions and i:
            with open(os.path.join(path, f"{i}.txt"), "w") as f:
                f.write(f"caption {i}")
    return str(path)


def test_kohya_toml_both_ways():
    text = '''
[general]
caption_extension = ".caption"
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = 'C:\\hoge'
  class_tokens = 'hoge girl'
  num_repeats = 10
  [[datasets.subsets]]
  is_reg = true
  image_dir = 'C:\\reg'
  class_tokens = 'girl'
'''
    got = cp.from_kohya_toml(text)
    assert got == [cp.Concept("C:\\hoge", 10, "hoge girl", ".caption"), cp.Concept("C:\\reg", 1, "girl", ".caption", True)]
    assert cp.from_kohya_toml(cp.to_kohya_toml(got)) == got
    with pytest.raises(cp.ConceptError, match="no image_dir"):
        cp.from_kohya_toml("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n")


def test_dreambooth_json_both_ways_with_more_than_three_concepts():
    text = '''[{"instance_data_dir": "/a", "instance_token": "alice", "class_data_dir": "/women", "class_token": "woman"},
              {"instance_data_dir": "/b"}, {"instance_data_dir": "/c"}, {"instance_data_dir": "/d", "instance_token": "d"}]'''
    got = cp.from_dreambooth_json(text)
    assert [c.folder for c in got] == ["/a", "/women", "/b", "/c", "/d"] and got[1].is_reg and got[1].name == "woman"
    assert cp.from_dreambooth_json(cp.to_dreambooth_json(got)) == got
    with pytest.raises(cp.ConceptError, match="trailing comma"):
        cp.from_dreambooth_json('[{"instance_data_dir": "/a"},]')


def test_prepare_links_or_copies_into_kohya_folders_and_keeps_originals(tmp_path):
    a = _folder(tmp_path / "src" / "alice pics", 3)
    r = _folder(tmp_path / "src" / "women", 2, captions=False)
    before = {p: os.stat(os.path.join(d, p)).st_mtime_ns for d in (a, r) for p in os.listdir(d)}
    concepts = [cp.Concept(a, 4, "alice"), cp.Concept(r, 1, "woman", is_reg=True)]
    for mode in ("link", "copy"):
        out = cp.prepare(concepts, str(tmp_path / f"prepared_{mode}"), mode)
        scan = dataset.scan(out["train"], out["reg"])
        assert scan.samples_per_epoch() == 24 and {i.concept for i in scan.items} == {"alice", "woman"}
        assert sorted(os.listdir(os.path.join(out["train"], "4_alice"))) == ["0.png", "1.png", "1.txt", "2.png", "2.txt"]
        assert os.path.samefile(os.path.join(out["train"], "4_alice", "0.png"), os.path.join(a, "0.png")) == (mode == "link")
        assert not os.path.islink(os.path.join(out["train"], "4_alice", "0.png"))    # hard links: the scan takes them
    after = {p: os.stat(os.path.join(d, p)).st_mtime_ns for d in (a, r) for p in os.listdir(d)}
    assert after == before                          # originals untouched
    with pytest.raises(cp.ConceptError, match="not empty"):
        cp.prepare(concepts, str(tmp_path / "prepared_link"))


def test_captions_listed_and_written(tmp_path):
    a = _folder(tmp_path / "a", 2)
    items = cp.images_with_captions(a)
    assert items[0][1] is None and items[1][1].endswith("1.txt")
    path = cp.write_caption(items[0][0], "  new caption \n")
    assert open(path).read() == "new caption" and not [n for n in os.listdir(a) if n.startswith(".tmp-")]


def test_table_rows_round_trip_and_bad_repeats():
    concepts = [cp.Concept("/a", 3, "x"), cp.Concept("/r", 1, "", ".txt", True)]
    assert cp.from_rows(cp.to_rows(concepts) + [["", "", "", "", False]]) == concepts
    with pytest.raises(cp.ConceptError, match="whole number"):
        cp.from_rows([["/a", "many", "", ".txt", False]])
