"""The LoRA tab's handlers (form, presets, dataset check, training session, merge) and the standalone app."""
import contextlib
import os
import time
import urllib.request

import pytest
import torch

from conftest import serve_app, tiny_model
from lora_ext import files, library
from random_networks import make_random_lora
from lora_ext.hosts.webui import WebuiHost
from lora_ext.library import LoraLibrary
from lora_ext import sample_data, tiny
from lora_ext.train.config import GUIDE_DEFAULTS, TrainConfig, load_toml
from lora_ext.train.loop import train
from lora_ext.ui import merge_tab, train_fields, train_tab
from lora_ext.ui.training_session import TrainingSession


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return sample_data.make_sample_dataset(str(tmp_path_factory.mktemp("uidata")), per_concept=2)


def _values(data, out, **changes):
    form = dict(GUIDE_DEFAULTS, train_data_dir=data["train"], output_dir=str(out), output_name="ui", resolution="64",
                train_batch_size=2, max_train_epochs=0, max_train_steps=4, network_dim=4, mixed_precision="no",
                sample_every_n_epochs=1, sample_prompts=["red circle"])
    cfg = TrainConfig(**form)
    for k, v in changes.items():
        setattr(cfg, k, v)
    return train_fields.options_to_values(cfg)


def test_the_form_round_trips_through_a_config(data, tmp_path):
    values = _values(data, tmp_path, text_encoder_lr=5e-5, network_args=["conv_dim=4", "conv_alpha=2"])
    cfg, msg = train_tab.form_to_config(values)
    assert msg == "" and cfg.text_encoder_lr == 5e-5 and cfg.net_args == {"conv_dim": "4", "conv_alpha": "2"}
    assert train_fields.options_to_values(cfg) == values
    bad = list(values)
    bad[[f.name for f in train_fields.FIELDS].index("max_token_length")] = "100"
    cfg, msg = train_tab.form_to_config(bad)
    assert cfg is None and "max_token_length must be 75, 150 or 225" in msg
    assert all(f.tip for f in train_fields.FIELDS) and len(train_fields.GROUPS) == 8


def _set(values, **fields):
    values = list(values)
    names = [f.name for f in train_fields.FIELDS]
    for k, v in fields.items():
        values[names.index(k)] = v
    return values


def test_the_network_type_controls_write_lycoris_options(data, tmp_path):
    values = _set(_values(data, tmp_path), algo="loha", dora_wd=True, network_args="conv_dim=2\nalgo=lokr")
    cfg, msg = train_tab.form_to_config(values)
    assert msg == "" and cfg.network_module == "lycoris.kohya"      # the module that trains LoHa, chosen for the user
    assert cfg.net_args == {"algo": "loha", "conv_dim": "2", "dora_wd": "True"}      # the control wins over the text
    shown = train_fields.options_to_values(cfg)
    assert shown == _set(values, network_module="lycoris.kohya", network_args="conv_dim=2")
    assert train_tab.form_to_config(shown)[0].net_args == cfg.net_args
    # kohya's own LoRA stays kohya's, without an algo entry
    plain, _ = train_tab.form_to_config(_values(data, tmp_path, network_args=["conv_dim=4"]))
    assert plain.network_module == "networks.lora" and plain.network_args == ["conv_dim=4"]


def test_a_lycoris_preset_loads_into_the_type_controls(data, tmp_path):
    folder = tmp_path / "presets"
    folder.mkdir()
    toml = (f'train_data_dir = "{data["train"]}"\noutput_dir = "{tmp_path}"\nnetwork_module = "lycoris.kohya"\n'
            'network_args = ["algo=LoKr", "factor=8", "dora_wd=true"]\n')
    (folder / "lokr.toml").write_text(toml)
    values, msg = train_tab.load_preset(str(folder), "lokr")
    names = [f.name for f in train_fields.FIELDS]
    assert values[names.index("algo")] == "lokr" and values[names.index("dora_wd")] is True, msg
    assert values[names.index("network_args")] == "factor=8"
    cfg, msg = train_tab.form_to_config(values)
    assert msg == "" and cfg.net_args == {"algo": "lokr", "factor": "8", "dora_wd": "True"}


def test_presets_are_the_toml_the_cli_reads(data, tmp_path):
    values = _values(data, tmp_path, learning_rate=3e-4)
    msg = train_tab.save_preset(str(tmp_path / "presets"), "my char", values)
    assert "Saved preset" in msg
    assert load_toml(str(tmp_path / "presets" / "my char.toml")).learning_rate == 3e-4
    loaded, msg = train_tab.load_preset(str(tmp_path / "presets"), "my char")
    assert loaded == values and train_tab.list_presets(str(tmp_path / "presets")) == ["my char"]
    assert "letters, digits" in train_tab.save_preset(str(tmp_path / "presets"), "../escape", values)
    assert not (tmp_path / "escape.toml").exists()
    assert train_tab.load_preset(str(tmp_path / "presets"), "missing")[0] is None
    assert train_tab.delete_preset(str(tmp_path / "presets"), "my char") == "Deleted preset **my char**."
    assert train_tab.list_presets(str(tmp_path / "presets")) == []
    assert "no preset" in train_tab.delete_preset(str(tmp_path / "presets"), "my char")
    assert "letters, digits" in train_tab.delete_preset(str(tmp_path / "presets"), "../x")


def test_dataset_check_reports_concepts_steps_and_problems(data, tmp_path):
    host = WebuiHost(tiny_model("sd1"))
    report, text = train_tab.check_dataset(lambda: host, _values(data, tmp_path))
    assert report is not None and "**4 steps**" in text and "redcircle: 2 images, 1 without caption" in text
    assert "Estimated memory: about **" in text and "on cpu (weights" in text
    assert "Network: **LoRA** (networks.lora), dim 4 alpha" in text
    _, text = train_tab.check_dataset(lambda: host, _set(_values(data, tmp_path, network_dropout=0.1), algo="lokr",
                                                         dora_wd=True))
    assert "Network: **LoKr + DoRA** (lycoris.kohya), dim 4" in text
    assert "note: network_dropout has no effect on LoKr" in text
    # the count is the run's: optimizer steps, so gradient accumulation divides it
    report, text = train_tab.check_dataset(lambda: host, _values(data, tmp_path, max_train_steps=0, max_train_epochs=2,
                                                                 gradient_accumulation_steps=3), None, False)
    batches_per_epoch = -(-report["samples_per_epoch"] // 2)
    assert f"**{2 * -(-batches_per_epoch // 3)} steps**" in text
    assert "not while a run is going" in train_tab.check_dataset(lambda: host, _values(data, tmp_path), None, False)[1]
    report, text = train_tab.check_dataset(lambda: host, _values(data, tmp_path, train_data_dir=str(tmp_path / "no")))
    assert report is None and text.startswith("**Dataset:**")


def test_a_training_session_runs_in_the_background_and_cancels(data, tmp_path):
    host = WebuiHost(tiny_model("sd1"))
    written = []
    session = TrainingSession(lambda cfg, ev, stop: train(host, cfg, ev, stop), lambda kind, p: written.append((kind, p)))
    cfg, _ = train_tab.form_to_config(_values(data, tmp_path))
    assert session.start(cfg) and not session.start(cfg)          # one run at a time
    session.wait(120)
    status, plot, samples = train_tab.progress(session)
    assert status.startswith("**Finished** after 4 steps") and os.path.exists(plot) and samples
    assert written == [("lora", session.result.lora_path)]         # the host refreshes its lists
    cfg, _ = train_tab.form_to_config(_values(data, tmp_path / "c", max_train_steps=50))
    session.start(cfg)
    deadline = time.time() + 60
    while not session.losses and time.time() < deadline:
        time.sleep(0.05)
    session.cancel()
    session.wait(60)
    assert session.status().startswith("**Cancelled**") and "Resume from" in session.status()
    stopped_at = session.result.steps
    cfg, msg = train_tab.form_to_config(_values(data, tmp_path / "c", max_train_steps=50, resume=session.result.state_path))
    assert msg == "" and session.start(cfg)
    session.wait(120)
    assert session.status().startswith("**Finished** after 50 steps") and stopped_at < 50
    assert any(e.kind == "message" and f"resumed at step {stopped_at}" in e.text for e in session.events)
    # an optimizer that cannot be built is the form's message before any run (it was the run's error)
    cfg, msg = train_tab.form_to_config(_values(data, tmp_path / "d", max_train_steps=50, optimizer_type="Nope"))
    assert cfg is None and "unknown optimizer_type" in msg


def test_two_train_clicks_at_one_moment_start_one_run_and_the_other_is_told(data, tmp_path):
    """The second click is answered while the first's estimate or run has the model; the run's weights are
    never swapped under it (it finishes), and a Check during it skips the estimate."""
    import threading

    model = tiny_model("sd1")
    host = WebuiHost(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    session = TrainingSession(lambda cfg, ev, stop: train(host, cfg, ev, stop))
    values = _values(data, tmp_path, max_train_steps=6, sample_every_n_epochs=0)
    gate, answers = threading.Barrier(2), []

    def click():
        gate.wait()
        answers.append(train_tab.start(session, lambda: host, lambda: contextlib.nullcontext(), "", values))

    clicks = [threading.Thread(target=click) for _ in range(2)]
    for t in clicks:
        t.start()
    for t in clicks:
        t.join(120)
    assert sorted(a.split("\n")[0] for a in answers) == [
        "A training run is already going (or its memory is being estimated): wait for it, or cancel it.",
        "Training started."]
    assert "not while a run is going" in train_tab.check(session, lambda: host, lambda: contextlib.nullcontext(), values) \
        or not session.running
    session.wait(120)
    assert session.error is None and session.result.steps == 6
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert train_tab.start(session, lambda: host, lambda: contextlib.nullcontext(), "",
                           _values(data, tmp_path / "again", max_train_steps=2, sample_every_n_epochs=0)).startswith(
        "Training started.")      # the model is given back when the run ends
    session.wait(120)
    assert session.result.steps == 2


def test_the_training_status_says_while_latents_are_being_cached():
    from lora_ext.train.events import Event

    session = TrainingSession(lambda cfg, ev, stop: None)
    session.events.append(Event("step", 3, 10, 1, 0.5, 0.5, 1e-4, latents=(3, 12)))
    assert session.status().startswith("Step 3/10") and "latents cached for 3 of 12 images" in session.status()
    session.events.append(Event("step", 4, 10, 1, 0.5, 0.5, 1e-4))
    assert session.status().startswith("Step 4/10") and "latents" not in session.status()


def test_merge_handler_keeps_names_in_their_folders(tmp_path):
    from safetensors.torch import load_file

    ckpts, loras = tmp_path / "ckpts", tmp_path / "loras"
    ckpts.mkdir(), loras.mkdir()
    model = tiny_model("sd1")
    tiny.save_checkpoint(model, str(ckpts / "base.safetensors"))
    files.write_kohya(str(loras / "a.safetensors"), files.kohya_tensors(make_random_lora(model)), {})
    lib = LoraLibrary(lambda: [str(loras)])
    msg = merge_tab.merge(str(ckpts), lib, "base.safetensors", "a.safetensors:0.8:0.5", "merged", "fp16", False)
    assert msg.startswith("Wrote **merged.safetensors**") and (ckpts / "merged.safetensors").exists()
    assert "exists" in merge_tab.merge(str(ckpts), lib, "base.safetensors", "a.safetensors", "merged", "fp16", False)
    assert "outside" in merge_tab.merge(str(ckpts), lib, "base.safetensors", "a.safetensors", "../x", "fp16", False)
    assert "not in the LoRA folders" in merge_tab.merge(str(ckpts), lib, "base.safetensors", "zzz.safetensors",
                                                        "y", "fp16", False)
    assert "Add at least one LoRA" in merge_tab.merge(str(ckpts), lib, "base.safetensors", " ", "y", "fp16", False)
    msg = merge_tab.merge(str(ckpts), lib, "base.safetensors", "a.safetensors", "old", "fp16", False, fmt="ckpt")
    assert msg.startswith("Wrote **old.ckpt**")
    state = torch.load(str(ckpts / "old.ckpt"), weights_only=True)
    merged = load_file(str(ckpts / "merged.safetensors"))
    sd = state.get("state_dict", state)
    key = next(k for k in merged if k.endswith("attn2.to_k.weight"))
    assert sd[key].dtype == torch.float16 and sd[key].shape == merged[key].shape


def test_the_standalone_app_serves_the_tab_on_loopback(tmp_path):
    block, ctx, port = serve_app(tmp_path / "work")
    try:
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
        config = urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30).read().decode()
    finally:
        block.close()
    assert "<html" in page.lower()
    for elem in ("lora_ext_train_start", "lora_ext_train_network_dim", "lora_ext_merge_go", "lora_ext_inspect_file",
                 "lora_ext_concepts_table"):
        assert elem in config
    assert os.path.exists(tmp_path / "work" / "Stable-diffusion" / "tiny-sd1.safetensors")


def test_concepts_tab_handlers(tmp_path):
    from lora_ext.ui import concepts_tab

    a = sample_data.make_sample_dataset(str(tmp_path / "d"), per_concept=3)
    red = os.path.join(a["train"], "5_redcircle")
    rows = [[red, 2, "red", ".txt", False], [os.path.join(a["reg"], "1_shape"), 1, "", ".txt", True]]
    text = concepts_tab.summary(rows)
    assert "**red** (2 repeats): 3 images, 2 captions, 100% of each epoch" in text and "regularization" in text
    toml = concepts_tab.export_text(rows, "kohya")
    back, msg = concepts_tab.import_text(toml, "kohya")
    assert back == rows and "Imported 2" in msg
    assert concepts_tab.import_text("{", "dreambooth")[0] is None
    msg, train, reg = concepts_tab.prepare(rows, str(tmp_path / "prepared"), "copy")
    assert msg.startswith("Prepared 7 files") and os.path.isdir(tmp_path / "prepared" / "train" / "2_red")
    assert (train, reg) == (str(tmp_path / "prepared" / "train"), str(tmp_path / "prepared" / "reg"))
    msg, train, reg = concepts_tab.prepare(rows, str(tmp_path / "prepared"), "copy")
    assert msg.startswith("**Cannot prepare:**") and train is None and reg is None
    kept, msg = concepts_tab.remove_row(rows, 1)
    assert kept == rows[1:] and msg == "Removed row 1."
    assert concepts_tab.remove_row(rows, 5) == (rows, "**No row 5:** the table has 2 rows.")
    assert concepts_tab.remove_row(rows[:1], 1)[0] == [["", 1, "", ".txt", False]]     # an empty row stays
    assert concepts_tab.concept_folders(rows + [["", 1, "", ".txt", False]]) == [red, os.path.join(a["reg"], "1_shape")]


def test_switching_the_checkpoint_of_the_standalone_model(tmp_path):
    import types

    from safetensors.torch import load_file, save_file

    from lora_ext.ui.app import StandaloneModel

    host = WebuiHost(tiny.build("sd1"))
    tiny.save_checkpoint(host.model, str(tmp_path / "a.safetensors"))
    other = load_file(str(tmp_path / "a.safetensors"))
    key = next(k for k in other if k.endswith("attn2.to_k.weight"))
    other[key] = other[key] + 1
    te_key = next(k for k in other if k.startswith("cond_stage_model.") and k.endswith("q_proj.weight"))
    other[te_key] = other[te_key] * 2
    save_file(other, str(tmp_path / "b.safetensors"))
    tiny.save_checkpoint(tiny.build("sd2"), str(tmp_path / "sd2.safetensors"))
    model = StandaloneModel(host, str(tmp_path), "a.safetensors")
    assert model.switch("b.safetensors") == "Loaded **b.safetensors**." and "b.safetensors" in model.label()
    assert torch.equal(host.model.state_dict()[key], other[key])
    assert torch.equal(host.model.state_dict()[te_key.replace("cond_stage_model.", "cond_stage_model.wrapped.")], other[te_key])
    msg = model.switch("sd2.safetensors")
    assert "does not fit this SD1 model" in msg and model.current == "b.safetensors"
    assert "outside" in model.switch("../x.safetensors")
    ctx = types.SimpleNamespace(switch_fn=model.switch)
    busy = types.SimpleNamespace(reserve=lambda: False, release=None)      # a session in the middle of a run
    assert "Not now" in train_tab.switch_checkpoint(ctx, busy, "a.safetensors") and model.current == "b.safetensors"
    # .ckpt files too, read without running pickled code
    torch.save({"state_dict": load_file(str(tmp_path / "a.safetensors"))}, str(tmp_path / "a.ckpt"))
    assert model.switch("a.ckpt") == "Loaded **a.ckpt**." and not torch.equal(host.model.state_dict()[key], other[key])
    (tmp_path / "bad.ckpt").write_bytes(b"not a torch file")
    assert model.switch("bad.ckpt").startswith("**Cannot load it:**") and model.current == "a.ckpt"


def test_caption_browser_and_interrogation(tmp_path):
    from lora_ext.ui import concepts_tab

    d = sample_data.make_sample_dataset(str(tmp_path / "d"), per_concept=3)
    red = os.path.join(d["train"], "5_redcircle")
    items, paths, msg = concepts_tab.browse(red, ".txt")
    assert len(items) == len(paths) == 3 and msg == "3 images, 1 without caption."
    missing = next(i for i, (_, cap) in enumerate(items) if cap == "(no caption)")
    image, caption = concepts_tab.pick(paths, missing, ".txt")
    assert image == paths[missing] and caption == ""
    assert concepts_tab.save_caption(image, "  a red circle, flat  ", ".txt").startswith("Saved")
    with open(os.path.splitext(image)[0] + ".txt") as f:
        assert f.read() == "a red circle, flat"
    assert concepts_tab.pick(paths, missing, ".txt")[1] == "a red circle, flat"
    assert concepts_tab.save_caption(None, "x", ".txt").startswith("Pick an image")
    assert concepts_tab.browse(str(tmp_path / "nope"), ".txt")[2].startswith("**No such folder")

    before = {p: open(os.path.splitext(p)[0] + ".txt").read() for p in paths}
    blue = os.path.join(d["train"], "3_bluesquare")
    _, blue_paths, _ = concepts_tab.browse(blue, ".txt")
    seen = []

    def describe(img):
        seen.append(img.size)
        return "a blue square" if img.getpixel((img.width // 2, img.height // 2))[2] > 128 else "something"
    msg = concepts_tab.caption_missing(blue, ".txt", "Test", {"Test": describe})
    had = sum(1 for p in blue_paths if os.path.exists(os.path.splitext(p)[0] + ".txt")) - len(seen)
    assert msg == f"Test: wrote {len(seen)} captions; {had} images already had one (left as they were)."
    assert all(open(os.path.splitext(p)[0] + ".txt").read() for p in blue_paths)
    assert concepts_tab.caption_missing(red, ".txt", "Test", {"Test": describe}).startswith("Test: wrote 0 captions")
    assert before == {p: open(os.path.splitext(p)[0] + ".txt").read() for p in paths}
    assert "No interrogator" in concepts_tab.caption_missing(red, ".txt", "CLIP", {})
    broken = lambda img: 1 / 0  # noqa: E731
    os.remove(os.path.splitext(paths[0])[0] + ".txt")
    assert "ZeroDivisionError" in concepts_tab.caption_missing(red, ".txt", "Bad", {"Bad": broken})


def _tool_folders(tmp_path):
    ckpts, loras = tmp_path / "ckpts", tmp_path / "loras"
    ckpts.mkdir(), loras.mkdir()
    model = tiny_model("sd1")
    tiny.save_checkpoint(model, str(ckpts / "base.safetensors"))
    files.write_kohya(str(loras / "a.safetensors"), files.kohya_tensors(make_random_lora(model, rank=4, seed=1)),
                      {"ss_output_name": "a"})
    files.write_kohya(str(loras / "b.safetensors"), files.kohya_tensors(make_random_lora(model, rank=4, seed=2)), {})
    return str(ckpts), str(loras), LoraLibrary(lambda: [str(loras)]), model


def test_lora_tools_handlers(tmp_path):
    ckpts, loras, lib, model = _tool_folders(tmp_path)
    written = []
    note = lambda kind, path: written.append((kind, os.path.basename(path)))  # noqa: E731
    msg, rows = merge_tab.merge_loras(loras, lib, "a.safetensors:0.5\nb.safetensors", 0, "ab", "fp16", False, note)
    assert msg.startswith("Wrote **ab.safetensors** at rank 8") and files.read(os.path.join(loras, "ab.safetensors")).by_kind()["linear"]["rank"] == 8
    msg, rows = merge_tab.merge_loras(loras, lib, "a.safetensors\nb.safetensors", 3, "ab3", "fp16", False, note)
    assert "at rank 3" in msg and rows and all(0 < r[1] <= 1 for r in rows) and rows == sorted(rows, key=lambda r: r[1])
    assert "exists" in merge_tab.merge_loras(loras, lib, "a.safetensors", 0, "ab", "fp16", False)[0]
    msg, rows = merge_tab.resize(loras, lib, "a.safetensors", "rank", 2, "a2", "fp16", False, note)
    assert msg.startswith("Wrote **a2.safetensors** (largest rank 2)") and len(rows) == len(files.read(os.path.join(loras, "a.safetensors")).modules)
    msg, _ = merge_tab.resize(loras, lib, "a.safetensors", "energy", 0.999, "a_e", "fp16", False, note)
    assert "Kept energy" in msg
    assert "outside" in merge_tab.resize(loras, lib, "a.safetensors", "rank", 2, "../a2", "fp16", False)[0]
    assert "choose a LoRA" in merge_tab.resize(loras, lib, "", "rank", 2, "x", "fp16", False)[0]
    assert "not in the LoRA folders" in merge_tab.resize(loras, lib, "zz.safetensors", "rank", 2, "x", "fp16", False)[0]
    merge_tab.merge(ckpts, lib, "base.safetensors", "a.safetensors", "tuned", "fp32", False, note)
    msg, rows = merge_tab.extract(ckpts, loras, "base.safetensors", "tuned.safetensors", 8, 0, "x", "fp16", False, note)
    assert msg.startswith("Wrote **x.safetensors**") and rows and min(r[1] for r in rows) > 0.99
    assert "do not differ" in merge_tab.extract(ckpts, loras, "base.safetensors", "base.safetensors", 8, 0, "y", "fp16", False)[0]
    assert written == [("lora", "ab.safetensors"), ("lora", "ab3.safetensors"), ("lora", "a2.safetensors"),
                       ("lora", "a_e.safetensors"), ("checkpoint", "tuned.safetensors"), ("lora", "x.safetensors")]
    assert merge_tab.add_lora_line("a:1:1", "b.safetensors", 0.5, 1.0) == "a:1:1\nb.safetensors:0.5:1"
    assert library.list_checkpoints(ckpts) == ["base.safetensors", "tuned.safetensors"]


def test_bake_into_the_loaded_model(tmp_path):
    from lora_ext.apply import Engine, Request
    from lora_ext.panel.runtime import PanelRuntime
    from lora_ext.panel import slots as slotlib

    _, loras, lib, _ = _tool_folders(tmp_path)
    host = WebuiHost(tiny.build("sd1"))         # baking changes the model for good: not the shared one
    expected_model = tiny.build("sd1")
    Engine().apply(WebuiHost(expected_model), [Request(os.path.join(loras, "a.safetensors"), 0.7, 0.3)])
    expected = {k: v.clone() for k, v in expected_model.state_dict().items()}
    runtime = PanelRuntime(lib)
    runtime.run(host, [slotlib.Slot(True, "b.safetensors")])       # a panel LoRA in place: given back first
    msg = merge_tab.bake(lambda items: runtime.bake(host, items), "a.safetensors:0.7:0.3")
    assert msg.startswith("Baked into the loaded model: a.safetensors") and "Load the checkpoint again" in msg
    assert all(torch.equal(v, expected[k]) for k, v in host.model.state_dict().items())
    runtime.run(host, [slotlib.Slot(True, "b.safetensors")])
    runtime.run(host, [])                                           # the panel gives back the baked weights
    assert all(torch.equal(v, expected[k]) for k, v in host.model.state_dict().items())
    assert "not in the LoRA folders" in merge_tab.bake(lambda items: runtime.bake(host, items), "zz.safetensors")
    assert "Add at least one LoRA" in merge_tab.bake(lambda items: runtime.bake(host, items), "")


def test_inspect_tables(tmp_path):
    from lora_ext.ui.inspect_tab import inspect_file

    model = tiny_model("sd1")
    meta = {"ss_learning_rate": "0.0001", "ss_tag_frequency": '{"5_red": {"red": 3, " circle": 5}, "3_blue": {"red": 1}}',
            "ss_dataset_dirs": '{"5_red": {"n_repeats": 5}}'}
    files.write_kohya(str(tmp_path / "a.safetensors"), files.kohya_tensors(make_random_lora(model, rank=4, alpha=2.0)), meta)
    summary, blocks, settings, tags, report = inspect_file(str(tmp_path), "a.safetensors")
    assert summary.startswith("**a.safetensors**: SD1 locon") and report["arch"] == "sd1"
    names = [b[0] for b in blocks]
    assert "te layer 0" in names and "unet down_blocks_1" in names and "unet mid_block" in names
    assert sum(b[1] for b in blocks) == report["modules"]["unet"] + report["modules"]["te"]
    assert all(b[3] == "2" for b in blocks if b[2] == "4")
    assert ["learning_rate", "0.0001"] in settings and not any(s[0] in ("tag_frequency", "dataset_dirs") for s in settings)
    assert tags == [["circle", 5, "5_red"], ["red", 3, "5_red"], ["red", 1, "3_blue"]]
