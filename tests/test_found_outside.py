"""What users found from outside (issue 37): a string "false" taken as true, numbers too large to be a float,
links out of a concept folder, folders and captions that cost without bound. Each test failed on the code
before its fix."""
import json
import os
import re

import pytest
import torch
from PIL import Image

from lora_ext.panel import slots as slotlib
from lora_ext.train import dataset
from lora_ext.train.dataset import DatasetError
from lora_ext.weights import flag_value, weight_value


def _img(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)


# --- "false" is false -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text,meant", [("false", False), ("False", False), ("0", False), ("no", False),
                                        ("off", False), ("", False), ("true", True), ("TRUE", True), ("1", True),
                                        ("yes", True), ("on", True), (0, False), (1, True), (True, True)])
def test_an_api_slot_reads_its_switches_as_written(text, meant):
    slot = slotlib.Slot.from_any({"enabled": text, "model": "a.safetensors", "separate": text, "unet": 0.5,
                                  "te": 0.25})
    assert slot.enabled is meant and slot.separate is meant
    assert slot.active is meant
    assert slot.weights == ((0.5, 0.25) if meant else (1.0, 1.0))


@pytest.mark.parametrize("bad", ["maybe", "2", 2, 0.5, [], {"a": 1}, "truee"])
def test_a_switch_that_is_neither_is_the_slots_warning(bad):
    slots, problems = slotlib.from_args([{"enabled": bad, "model": "a.safetensors"}, {"enabled": True, "model": "b"}], {})
    assert problems == [f"slot 1: slot enabled {bad!r} is not true or false"]
    assert not slots[0].active and slots[1].active          # the other slot still acts


def test_xyz_overrides_take_the_same_switches():
    slot = slotlib.Slot.from_any({"enabled": True, "model": "a.safetensors"})
    assert slotlib.with_overrides([slot], {0: {"enabled": "false"}})[0].active is False
    with pytest.raises(ValueError, match="slot separate 'x' is not true or false"):
        slotlib.with_overrides([slot], {0: {"separate": "x"}})


def test_a_kohya_dataset_toml_is_reg_false_is_not_regularization(tmp_path):
    from lora_ext import concepts as cp

    text = '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nis_reg = "false"\n[[datasets.subsets]]\nimage_dir = "b"\nis_reg = true\n'
    assert [c.is_reg for c in cp.from_kohya_toml(text)] == [False, True]
    with pytest.raises(cp.ConceptError, match="is_reg 'sometimes' is not true or false"):
        cp.from_kohya_toml('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nis_reg = "sometimes"\n')


def test_the_train_options_read_switches_the_same_way():
    from lora_ext.train.config import ConfigError, from_dict

    assert from_dict({"flip_aug": "false", "shuffle_caption": "On"}).flip_aug is False
    assert from_dict({"flip_aug": "false", "shuffle_caption": "On"}).shuffle_caption is True
    with pytest.raises(ConfigError, match="flip_aug = 'nope' is not true or false"):
        from_dict({"flip_aug": "nope"})


# --- numbers a float cannot hold ---------------------------------------------------------------------------

def test_a_400_digit_weight_is_a_message_not_an_overflow():
    huge = int("9" * 400)
    with pytest.raises(ValueError, match="must be a finite number from -100 to 100"):
        weight_value(huge, "slot weight")
    slots, problems = slotlib.from_args([{"enabled": True, "model": "a.safetensors", "weight": huge}], {})
    assert len(problems) == 1 and "slot weight 9999999999" in problems[0] and "..." in problems[0]
    assert not slots[0].active
    with pytest.raises(ValueError, match="is not a number"):
        weight_value(True, "slot weight")         # a switch where a number belongs
    assert flag_value(None, "x") is False


# --- links out of a concept folder ------------------------------------------------------------------------

def test_links_out_of_a_concept_folder_are_skipped_and_named(tmp_path):
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("password: hunter2", encoding="utf-8")
    _img(str(tmp_path / "outside" / "far.png"))
    concept = tmp_path / "train" / "2_me"
    _img(str(concept / "a.png"))
    (concept / "a.txt").symlink_to(secret)                   # the caption leaves the folder
    (concept / "b.png").symlink_to(tmp_path / "outside" / "far.png")     # so does this image
    _img(str(concept / "c.png"))
    (concept / "c.txt").write_text("kept, caption", encoding="utf-8")
    _img(str(concept / "sub.png"))
    (concept / "d.png").symlink_to(concept / "sub.png")      # a link that stays inside is followed
    scan = dataset.scan(str(tmp_path / "train"))
    assert sorted(os.path.basename(i.path) for i in scan.items) == ["c.png", "d.png", "sub.png"]
    skipped = {os.path.basename(p): r for p, r in scan.skipped}
    assert set(skipped) == {"a.png", "b.png"}
    assert "a.txt is a link that leads out of its concept folder" in skipped["a.png"]
    assert "b.png is a link that leads out of its concept folder" in skipped["b.png"]
    report = dataset.report(scan, 75)
    assert "hunter2" not in str(report["tag_frequency"]) and "password" not in str(report)


def test_a_concept_folder_that_is_a_link_is_the_users_choice(tmp_path):
    real = tmp_path / "photos"
    _img(str(real / "a.png"))
    (real / "a.txt").write_text("a caption", encoding="utf-8")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "3_me").symlink_to(real)
    scan = dataset.scan(str(tmp_path / "train"))
    assert [i.caption for i in scan.items] == ["a caption"] and not scan.skipped


# --- what a folder name or a caption can cost --------------------------------------------------------------

def test_a_folder_with_a_trillion_repeats_is_refused_before_any_plan(tmp_path):
    _img(str(tmp_path / "999999999999_x" / "a.png"))
    with pytest.raises(DatasetError, match=r"999999999999 repeats; at most 10000 \(rename the folder, e.g. '100_x'"):
        dataset.scan(str(tmp_path))


def test_an_epoch_of_more_images_than_the_bound_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "MAX_SAMPLES_PER_EPOCH", 50)
    for i in range(6):
        _img(str(tmp_path / "10_x" / f"{i}.png"))
    with pytest.raises(DatasetError, match="60 images an epoch .* at most 50"):
        dataset.scan(str(tmp_path))


def test_a_50_mb_caption_is_read_to_its_bound_and_said(tmp_path):
    _img(str(tmp_path / "1_x" / "a.png"))
    with open(tmp_path / "1_x" / "a.txt", "wb") as f:
        f.write(b"tag, " * (10 * 1024 * 1024))
    scan = dataset.scan(str(tmp_path))
    assert len(scan.items[0].caption.encode()) <= dataset.MAX_CAPTION_BYTES
    assert any("caption is longer than 64 KiB; only its first 64 KiB are read" in w for w in scan.warnings)


# --- caches made for something else -----------------------------------------------------------------------

def test_a_latent_cache_made_by_another_model_or_of_another_shape_is_encoded_again(tmp_path):
    import torch
    from safetensors.torch import save_file

    from lora_ext.train import batches

    _img(str(tmp_path / "1_x" / "a.png"))
    scan = dataset.scan(str(tmp_path))
    sample = batches.epoch_plan(scan.train_items, [], dataset.Layout((64, 64)), 1, 0, 0)[0][0]
    calls = []

    def encode(scale):
        def run(px):
            calls.append(scale)
            return px[:, :, ::8, ::8].mean(1, keepdim=True).repeat(1, 4, 1, 1) * scale
        return run

    aug = batches.Augment()
    sd1 = batches.LatentCache(encode(1.0), to_disk=True, precision="vae-a:0.18215").get(sample, aug, False)
    xl = batches.LatentCache(encode(2.0), to_disk=True, precision="vae-b:0.13025").get(sample, aug, False)
    assert calls == [1.0, 2.0] and torch.equal(xl, sd1 * 2)         # not the other model's latents
    # an entry with the right name and stamp whose latent is of another shape: treated as missing
    cache = batches.LatentCache(encode(3.0), to_disk=True, precision="vae-b:0.13025")
    path = cache._file(sample.item, sample.bucket, False, batches.resize_filter(sample, aug))
    stamp = os.stat(sample.item.path)
    save_file({"latent": torch.zeros(4, 3, 3)}, path,
              {"stamp": cache._stamp_text((stamp.st_mtime_ns, stamp.st_size))})
    again = cache.get(sample, aug, False)
    assert calls == [1.0, 2.0, 3.0] and tuple(again.shape) == tuple(xl.shape)


def test_a_run_keys_its_latents_by_the_vae_and_the_latent_scale():
    from conftest import tiny_model
    from lora_ext.hosts.webui import WebuiHost
    from lora_ext.train.text_cache import fingerprint

    sd1, xl = WebuiHost(tiny_model("sd1")), WebuiHost(tiny_model("sdxl"))
    assert (fingerprint([sd1.vae]), sd1.latent_scale) != (fingerprint([xl.vae]), xl.latent_scale)
    assert fingerprint([sd1.vae]) == fingerprint([WebuiHost(tiny_model("sd1")).vae])


# --- a resume trusts nothing in its state ------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_state(tmp_path_factory):
    """A run of 2 steps (of an epoch of 3 batches) with save_state: (its config kwargs, its state folder)."""
    from conftest import tiny_model
    from lora_ext.hosts.webui import WebuiHost
    from lora_ext import sample_data
    from lora_ext.train.config import TrainConfig
    from lora_ext.train.loop import train

    root = tmp_path_factory.mktemp("state")
    data = sample_data.make_sample_dataset(str(root / "data"), size=64, per_concept=3)
    kw = dict(train_data_dir=data["train"], caption_extension=".txt", output_name="t", resolution="64",
              train_batch_size=2, network_dim=4, network_alpha=2, learning_rate=1e-3, lr_scheduler="constant",
              mixed_precision="no", save_precision="fp32", seed=7, save_state=True)
    result = train(WebuiHost(tiny_model("sd1")), TrainConfig(output_dir=str(root / "out"), max_train_steps=2, **kw))
    assert result.steps == 2 and result.state_path
    return kw, result.state_path, root


def _edited_state(saved_state, tmp_path, edit_json=None, edit_tensors=None):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    _, folder, _ = saved_state
    copy = tmp_path / "edited-state"
    shutil.copytree(folder, copy)
    doc = json.loads((copy / "state.json").read_text())
    if edit_json:
        edit_json(doc)
        (copy / "state.json").write_text(json.dumps(doc))
    if edit_tensors:
        path = copy / doc["tensors"]
        tensors = load_file(str(path))
        edit_tensors(tensors)
        save_file(tensors, str(path), {"format": "lora_ext-training-state/1"})
    return str(copy)


def _nan_network(t):
    key = next(k for k in t if k.startswith("network."))
    t[key] = t[key].clone().fill_(float("nan"))


def _pop(key):
    return lambda d: d.pop(key)


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


@pytest.mark.parametrize("edit_json,edit_tensors,message", [
    (_set("step", 10 ** 12), None, "step 1000000000000 with 2 losses"),
    (_set("step", 1e12), None, "step 1000000000000.0 is not a whole number"),
    (_set("step", -5), None, "step -5 is not a whole number from 0"),
    (_set("step", "abc"), None, "step 'abc' is not a whole number"),
    (_set("step", 2.5), None, "step 2.5 is not a whole number"),
    (_set("step", True), None, "step True is not a whole number"),
    (_set("epoch", 10 ** 9), None, "epoch 1000000000 after 2 steps"),
    (_set("losses", [1.0, float("nan")]), None, "losses is not a list of finite numbers"),
    (_pop("step"), None, "step None is not a whole number"),
    (_pop("losses"), None, "losses is not a list"),
    (_pop("optimizer"), None, "its optimizer entry is damaged"),
    (_set("optimizer", {"state": [], "param_groups": 3}), None, "its optimizer entry is damaged"),
    (None, _nan_network, "holds NaN or infinite values (network."),
    (None, lambda t: t.__setitem__("torch_rng", t["torch_rng"][:10]), "random-number state is missing"),
    (None, lambda t: t.pop("torch_rng"), "random-number state is missing"),
])
def test_a_state_that_lies_is_refused_before_any_step(saved_state, tmp_path, edit_json, edit_tensors, message):
    from conftest import tiny_model
    from lora_ext.hosts.webui import WebuiHost
    from lora_ext.train.config import TrainConfig
    from lora_ext.train.loop import train
    from lora_ext.train.state import StateError

    kw, _, _ = saved_state
    model = tiny_model("sd1")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = _edited_state(saved_state, tmp_path, edit_json, edit_tensors)
    with pytest.raises(StateError, match=re.escape(message)):
        train(WebuiHost(model), TrainConfig(output_dir=str(tmp_path / "o"), max_train_steps=4, resume=path, **kw))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not os.path.exists(tmp_path / "o" / "t.safetensors")


def test_a_finished_run_continues_when_asked_for_more_steps(saved_state, tmp_path):
    from conftest import tiny_model
    from lora_ext.hosts.webui import WebuiHost
    from lora_ext.train.config import TrainConfig
    from lora_ext.train.loop import train
    from lora_ext.train.state import StateError

    kw, folder, _ = saved_state
    host = WebuiHost(tiny_model("sd1"))
    straight = train(host, TrainConfig(output_dir=str(tmp_path / "s"), max_train_steps=4, **kw))
    more = train(host, TrainConfig(output_dir=str(tmp_path / "m"), max_train_steps=4, resume=folder, **kw))
    assert more.steps == 4 and more.losses[:2] == straight.losses[:2]
    assert more.losses == pytest.approx(straight.losses, abs=1e-6)
    with pytest.raises(StateError, match="is at step 2, and this run has 2 steps: raise max_train_steps"):
        train(host, TrainConfig(output_dir=str(tmp_path / "n"), max_train_steps=2, resume=folder, **kw))


# --- a file whose shapes lie costs its slot only ------------------------------------------------------------

def test_a_lying_lycoris_file_in_one_slot_leaves_the_other_slots_applied(tmp_path):
    from safetensors.torch import save_file

    from conftest import tiny_model
    from lora_ext import files
    from random_networks import make_random_lora, make_random_network
    from lora_ext.hosts.webui import WebuiHost
    from lora_ext.library import LoraLibrary
    from lora_ext.panel.runtime import PanelRuntime

    model = tiny_model("sd1")
    host = WebuiHost(model)
    folder = tmp_path / "loras"
    folder.mkdir()
    files.write_kohya(str(folder / "good.safetensors"), files.kohya_tensors(make_random_lora(model)), {})
    tensors = files.kohya_tensors(make_random_network(model, "loha", seed=6))
    key = next(k for k in sorted(tensors) if k.endswith(".hada_w1_a"))
    tensors[key] = tensors[key].flatten()[0].contiguous()           # a 0-d factor
    save_file(tensors, str(folder / "bad.safetensors"))
    runtime = PanelRuntime(LoraLibrary(lambda: [str(folder)]))
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        out = runtime.run(host, [slotlib.Slot(True, "bad.safetensors"), slotlib.Slot(True, "good.safetensors")])
        assert len(out.messages) == 1 and "bad.safetensors: skipped" in out.messages[0] and "hada_w1_a []" in out.messages[0]
        assert "AddNet Model 2" in out.infotext and "AddNet Model 1" not in out.infotext
        assert any(not torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    finally:
        runtime.restore(host)
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_metadata_nested_past_reason_is_shown_as_its_text(tmp_path, capsys):
    from lora_ext import cli, files
    from random_networks import make_random_lora
    from conftest import tiny_model

    deep = "[" * 5000 + "]" * 5000
    shallow_but_deep = "[" * 40 + "]" * 40
    digits = "[" + "9" * 5000 + "]"
    path = str(tmp_path / "l.safetensors")
    files.write_kohya(path, files.kohya_tensors(make_random_lora(tiny_model("sd1"))),
                      {"ss_tag_frequency": deep, "ss_dataset_dirs": shallow_but_deep, "ss_network_args": digits,
                       "ss_seed": '{"a": {"b": 1}}'})
    assert cli.main(["inspect", path]) == 0
    report = capsys.readouterr().out
    assert "Traceback" not in report and '"[[[[' in report
    import json
    meta = json.loads(report)["metadata"]
    assert meta["ss_tag_frequency"] == deep and meta["ss_dataset_dirs"] == shallow_but_deep
    assert meta["ss_network_args"] == digits and meta["ss_seed"] == {"a": {"b": 1}}


@pytest.mark.parametrize("mode,value,bits", [("I;16", 32768, 16), ("I", 32768, 16), ("L", 128, 8)])
def test_a_16_bit_grey_mask_at_half_is_half(mode, value, bits):
    import base64
    import io

    import numpy as np

    from lora_ext.panel import masks

    if mode == "I;16":
        image = Image.fromarray(np.full((8, 8), value, dtype=np.uint16), "I;16")
    else:
        image = Image.new(mode, (8, 8), value)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    mask = masks.decode(base64.b64encode(buffer.getvalue()).decode())
    assert float(mask.pixels.mean()) == pytest.approx(value / (2 ** bits - 1), abs=1e-4)


def test_merge_loras_keeps_every_module_a_file_holds(tmp_path):
    """Modules for layers the standard layout lacks (a LoRA made on a model of another depth) are kept by
    merge-loras as resize keeps them, never dropped without a word."""
    from conftest import tiny_model
    from lora_ext import files
    from random_networks import make_random_lora
    from lora_ext.tools.lora_tools import merge_lora_files

    tensors = files.kohya_tensors(make_random_lora(tiny_model("sd1"), conv_rank=None))
    name = next(k for k in sorted(tensors) if "transformer_blocks_0_attn1_to_q" in k).split(".")[0]
    for key in [k for k in tensors if k.startswith(name + ".")]:
        tensors[key.replace("transformer_blocks_0", "transformer_blocks_1")] = tensors[key].clone()
    path = str(tmp_path / "deeper.safetensors")
    files.write_kohya(path, tensors, {})
    held = files.read(path)
    assert held.foreign and len(held.modules) + len(held.foreign) == len({k.split(".")[0] for k in tensors})
    report = merge_lora_files([(path, 1.0)], str(tmp_path / "merged.safetensors"), precision="fp32")
    merged = files.read(str(tmp_path / "merged.safetensors"))
    assert report["modules"] == len(merged.modules) + len(merged.foreign) == len(held.modules) + len(held.foreign)
    for name, module in {**held.modules, **held.foreign}.items():
        kept = {**merged.modules, **merged.foreign}[name]
        shape = (module.out_in()[0], module.out_in()[1])
        torch.testing.assert_close(kept.delta(shape), module.delta(shape), rtol=1e-5, atol=1e-6)


# --- compare: no grid labels a LoRA it did not apply; no read blocks --------------------------------------

@pytest.mark.parametrize("bad", ["nan", "sd2"])
def test_compare_stops_at_a_lora_the_engine_refuses(tmp_path, capsys, bad):
    from conftest import tiny_model
    from lora_ext import cli, files
    from random_networks import make_random_lora

    run = tmp_path / "out"
    run.mkdir()
    model = tiny_model("sd1")
    files.write_kohya(str(run / "r-000001.safetensors"), files.kohya_tensors(make_random_lora(model, seed=1)),
                      {"ss_steps": "1"})
    if bad == "nan":
        modules = make_random_lora(model, seed=2)
        tensors = files.kohya_tensors(modules)
        key = next(k for k in tensors if k.endswith("lora_up.weight"))
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        from safetensors.torch import save_file
        save_file(tensors, str(run / "r.safetensors"), {"ss_steps": "2"})
    else:
        files.write_kohya(str(run / "r.safetensors"), files.kohya_tensors(make_random_lora(tiny_model("sd2"))),
                          {"ss_steps": "2"})
    rc = cli.main(["compare", str(run), "--model", "tiny-sd1", "--prompt", "a cat", "--weights", "1", "--steps", "1",
                   "--size", "64", "--out", str(tmp_path / "grid")])
    err = capsys.readouterr().err
    assert rc == 2 and "r.safetensors" in err and "the comparison stops" in err and "Traceback" not in err
    index = json.loads((tmp_path / "grid" / "index.json").read_text())
    assert [c["save"] for c in index["cells"]] == ["r-000001.safetensors"]     # the sound column only
    assert not index["pages"]


def test_a_fifo_named_like_a_lora_does_not_block_compare(tmp_path):
    import signal

    from conftest import tiny_model
    from lora_ext import files
    from random_networks import make_random_lora
    from lora_ext.tools import compare

    files.write_kohya(str(tmp_path / "r.safetensors"), files.kohya_tensors(make_random_lora(tiny_model("sd1"))), {})
    os.mkfifo(tmp_path / "r-000001.safetensors")
    signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("blocked on the FIFO")))
    signal.alarm(20)
    try:
        saves = compare.run_saves(str(tmp_path))
        runs = compare.runs_in(str(tmp_path))
    finally:
        signal.alarm(0)
    assert [os.path.basename(s.path) for s in saves] == ["r.safetensors"] and runs == ["r"]


# --- one run per output ------------------------------------------------------------------------------------

def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(tmp_path):
    import threading

    from conftest import tiny_model
    from lora_ext.hosts.webui import WebuiHost
    from lora_ext import sample_data
    from lora_ext.train.config import ConfigError, TrainConfig
    from lora_ext.train.loop import train

    data = sample_data.make_sample_dataset(str(tmp_path / "data"), size=64, per_concept=2)
    kw = dict(train_data_dir=data["train"], caption_extension=".txt", output_dir=str(tmp_path / "out"),
              output_name="same", resolution="64", train_batch_size=1, max_train_steps=3, network_dim=4,
              network_alpha=2, learning_rate=1e-3, lr_scheduler="constant", mixed_precision="no",
              save_precision="fp32", save_state=True)
    first_started, second_done, outcome = threading.Event(), threading.Event(), {}

    def on_event(e):
        if e.kind == "step":
            first_started.set()
            second_done.wait(60)        # the first run is mid-way while the second starts

    def first():
        outcome["first"] = train(WebuiHost(tiny_model("sd1")), TrainConfig(**kw), on_event=on_event)

    thread = threading.Thread(target=first)
    thread.start()
    assert first_started.wait(120)
    try:
        with pytest.raises(ConfigError, match="another training run is writing .*same.safetensors now"):
            train(WebuiHost(tiny_model("sd1")), TrainConfig(**kw))
    finally:
        second_done.set()
        thread.join(120)
    assert outcome["first"].steps == 3
    assert sorted(os.listdir(tmp_path / "out")) == ["same-state", "same.safetensors"]   # the claim is gone
    again = train(WebuiHost(tiny_model("sd1")), TrainConfig(**{**kw, "output_name": "other"}))
    assert again.steps == 3


def test_a_claim_left_by_a_killed_run_does_not_block(tmp_path):
    """The claim is an OS lock: a process killed with -9 holds none, whatever file it left."""
    from lora_ext.train import outputs
    from lora_ext.train.config import TrainConfig

    cfg = TrainConfig(output_dir=str(tmp_path), output_name="x")
    (tmp_path / ".x.lora_ext-claim").write_text("left by a killed run")
    with outputs.claimed(cfg):
        assert (tmp_path / ".x.lora_ext-claim").exists()
    assert not (tmp_path / ".x.lora_ext-claim").exists()


# --- every size a checkpoint states comes from it --------------------------------------------------------

@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_a_text_encoder_of_unusual_mlp_width_loads_and_trains(tmp_path, arch):
    """A single-file checkpoint whose text encoder's MLP is 37 wide on a 32-wide encoder (no ratio rule gives
    it): read in the file's own sizes, weight for weight, and trained on."""
    from lora_ext import cli
    from lora_ext.hosts import ldm_layout
    from lora_ext.hosts.checkpoint import load_checkpoint
    from lora_ext import sample_data, tiny

    model = tiny.build(arch, seed=3)
    if arch == "sd1":
        new = ldm_layout.HFTextEncoderHolder(32, 2, tiny.SPECS["sd1"].te_heads, intermediate=37)
    else:
        new = ldm_layout.OpenClipHolder(32, 3, tiny.SPECS["sd2"].openclip_heads, intermediate=37)
    with torch.no_grad():
        for p in new.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    model.cond_stage_model.wrapped = new
    path = str(tmp_path / "odd.safetensors")
    tiny.save_checkpoint(model, path)
    loaded = load_checkpoint(path)
    own = {k: v for k, v in model.state_dict().items() if k.startswith("cond_stage_model.")}
    back = loaded.state_dict()
    assert own and all(torch.equal(back[k], v) for k, v in own.items())
    data = sample_data.make_sample_dataset(str(tmp_path / "data"), size=64, per_concept=1)
    rc = cli.main(["train", "--pretrained_model_name_or_path", path, "--train_data_dir", data["train"],
                   "--output_dir", str(tmp_path / "out"), "--output_name", "odd", "--resolution", "64",
                   "--max_train_steps", "1", "--network_dim", "2"])
    assert rc == 0 and (tmp_path / "out" / "odd.safetensors").exists()


# --- sample_prompts is a file in kohya ---------------------------------------------------------------------

KOHYA_PROMPTS = """# prompt 1
masterpiece, best quality, (1girl), in white shirts, upper body, looking at viewer, simple background --n low quality, worst quality, bad anatomy,bad composition, poor, low effort --w 768 --h 768 --d 1 --l 7.5 --s 28

# prompt 2
masterpiece, best quality, 1boy, in business suit, standing at street, looking back --n (low quality, worst quality), bad anatomy,bad composition, poor, low effort --w 576 --h 832 --d 2 --l 5.5 --s 40
"""


def test_kohyas_prompt_file_examples_read_as_kohya_reads_them(tmp_path):
    from lora_ext.train import prompts

    txt = tmp_path / "p.txt"
    txt.write_text(KOHYA_PROMPTS, encoding="utf-8")
    first, second = prompts.load([str(txt)])
    assert first.prompt.startswith("masterpiece, best quality, (1girl)") and first.prompt.endswith("simple background")
    assert first.negative == "low quality, worst quality, bad anatomy,bad composition, poor, low effort"
    assert (first.width, first.height, first.seed, first.scale, first.steps) == (768, 768, 1, 7.5, 28)
    assert (second.width, second.height, second.seed, second.scale, second.steps) == (576, 832, 2, 5.5, 40)
    assert second.negative.startswith("(low quality, worst quality)")
    toml = tmp_path / "p.toml"
    toml.write_text('[prompt]\nsample_steps = 30\nwidth = 512\nheight = 512\nscale = 7\nseed = 4\n'
                    '[[prompt.subset]]\nprompt = "a cat"\n[[prompt.subset]]\nprompt = "a dog"\nwidth = 768\n'
                    'negative_prompt = "blurry"\n', encoding="utf-8")
    cat, dog = prompts.load([str(toml)])
    assert (cat.prompt, cat.width, cat.steps, cat.seed, dog.width, dog.negative) == ("a cat", 512, 30, 4, 768, "blurry")
    js = tmp_path / "p.json"
    js.write_text(json.dumps([{"prompt": "a cow", "sample_steps": 9}, "a pig --w 72 --s 3"]), encoding="utf-8")
    cow, pig = prompts.load([str(js)])
    assert (cow.prompt, cow.steps, pig.prompt, pig.width, pig.steps) == ("a cow", 9, "a pig", 72, 3)
    assert [p.prompt for p in prompts.load(["a red circle --n blue", "a square"])] == ["a red circle", "a square"]


@pytest.mark.parametrize("entry,text,message", [
    ("missing.txt", None, "missing.txt does not exist"),
    ("p.txt", "a cat --q 3\n", "--q 3 is none of kohya's prompt options"),
    ("p.txt", "a cat --w wide\n", "--w wide is none of kohya's prompt options"),
    ("p.txt", "a cat --s 0\n", "steps 0 is out of range"),
    ("p.txt", "a cat --l 99\n", "CFG scale 99 is out of range"),
    ("p.toml", "[prompt]\nwidth = 5\n", "a TOML prompt file has a [prompt] table with [[prompt.subset]]"),
    ("p.toml", "prompt = = 1\n", "not valid TOML"),
    ("p.json", "{\"prompt\": \"x\"}", "a JSON prompt file is a list"),
    ("p.json", "[{\"prompt\": \"x\", \"guidance\": 3}]", "guidance is not a prompt key"),
    ("p.json", "[" * 5000 + "]" * 5000, "not valid JSON"),
])
def test_a_prompt_file_that_is_wrong_is_said_before_the_model_loads(tmp_path, entry, text, message):
    from lora_ext.train.config import ConfigError, from_dict

    if text is not None:
        (tmp_path / entry).write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict({"sample_prompts": str(tmp_path / entry)})


def test_previews_follow_each_prompts_own_settings(tmp_path):
    from conftest import tiny_model
    from lora_ext.hosts.webui import WebuiHost
    from lora_ext import sample_data
    from lora_ext.train.config import TrainConfig
    from lora_ext.train.loop import train

    data = sample_data.make_sample_dataset(str(tmp_path / "data"), size=64, per_concept=1)
    (tmp_path / "p.txt").write_text("# two previews\na red circle --w 64 --h 128 --s 2 --d 5 --ss k_euler\n"
                                    "a blue square --n red --s 1\n", encoding="utf-8")
    events = []
    result = train(WebuiHost(tiny_model("sd1")), TrainConfig(
        train_data_dir=data["train"], output_dir=str(tmp_path / "out"), output_name="p", resolution="64",
        max_train_steps=1, network_dim=2, mixed_precision="no", sample_every_n_steps=1,
        sample_prompts=[str(tmp_path / "p.txt")]), on_event=events.append)
    paths = [p for e in events if e.kind == "sample" for p in e.paths]
    assert result.steps == 1 and len(paths) == 2
    assert Image.open(paths[0]).size == (64, 128) and Image.open(paths[1]).size == (64, 64)
    assert any("ask for sampler k_euler: the previews are drawn with DDIM" in m for m in result.messages)
