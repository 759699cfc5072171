"""The LoRA tab's handlers (form, presets, dataset check, training session, merge) and the standalone app."""
import os
import time
import urllib.request

import pytest

from conftest import serve_app, tiny_model
from lora_ext import files
from lora_ext.demo import make_random_lora
from lora_ext.hosts.webui import WebuiHost
from lora_ext.library import LoraLibrary
from lora_ext.testing import sample_data, tiny
from lora_ext.train.config import TrainConfig, load_toml
from lora_ext.train.loop import train
from lora_ext.ui import merge_tab, train_fields, train_tab
from lora_ext.ui.training_session import TrainingSession


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return sample_data.make_sample_dataset(str(tmp_path_factory.mktemp("uidata")), per_concept=2)


def _values(data, out, **changes):
    cfg = TrainConfig(train_data_dir=data["train"], output_dir=str(out), output_name="ui", resolution="64",
                      train_batch_size=2, max_train_steps=4, network_dim=4, mixed_precision="no",
                      sample_every_n_epochs=1, sample_prompts=["red circle"])
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


def test_dataset_check_reports_concepts_steps_and_problems(data, tmp_path):
    host = WebuiHost(tiny_model("sd1"))
    report, text = train_tab.check_dataset(lambda: host, _values(data, tmp_path))
    assert report is not None and "**4 steps**" in text and "redcircle: 2 images, 1 without caption" in text
    report, text = train_tab.check_dataset(lambda: host, _values(data, tmp_path, train_data_dir=str(tmp_path / "no")))
    assert report is None and text.startswith("**Dataset:**")


def test_a_training_session_runs_in_the_background_and_cancels(data, tmp_path):
    host = WebuiHost(tiny_model("sd1"))
    session = TrainingSession(lambda cfg, ev, stop: train(host, cfg, ev, stop))
    cfg, _ = train_tab.form_to_config(_values(data, tmp_path))
    assert session.start(cfg) and not session.start(cfg)          # one run at a time
    session.wait(120)
    status, plot, samples = train_tab.progress(session)
    assert status.startswith("**Finished** after 4 steps") and os.path.exists(plot) and samples
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
    cfg, _ = train_tab.form_to_config(_values(data, tmp_path / "d", max_train_steps=50, optimizer_type="Nope"))
    session.start(cfg)
    session.wait(60)
    assert "Stopped by an error" in session.status() and "unknown optimizer_type" in session.status()


def test_merge_handler_keeps_names_in_their_folders(tmp_path):
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
    msg = concepts_tab.prepare(rows, str(tmp_path / "prepared"), "copy")
    assert msg.startswith("Prepared 7 files") and os.path.isdir(tmp_path / "prepared" / "train" / "2_red")
    assert concepts_tab.prepare(rows, str(tmp_path / "prepared"), "copy").startswith("**Cannot prepare:**")
