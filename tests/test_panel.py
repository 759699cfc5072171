"""The Additional Networks panel in our webui double: generation, infotext round trip, API, X/Y/Z, routes."""
import copy
import hashlib
import os
import shutil
import struct

import gradio as gr
import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_model
from lora_ext import files
from random_networks import make_random_lora
from lora_ext.panel.slots import Slot


def _write_lora(path, model, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    modules = make_random_lora(model, rank=4, alpha=4.0, conv_rank=None, seed=seed)
    for m in modules.values():
        m.parts["lora_up.weight"] = m.parts["lora_up.weight"] * 20     # visible in a 3-step tiny image
    files.write_kohya(path, files.kohya_tensors(modules), {"ss_resolution": "(512, 512)", "ss_max_train_steps": "300"},
                      overwrite=True)


def _addnet_hash(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    return hashlib.sha256(data[8 + n:]).hexdigest()


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    from modules import script_callbacks, scripts, shared

    home = tmp_path_factory.mktemp("webui")
    lora_dir = home / "models" / "Lora"
    model = copy.deepcopy(tiny_model("sd1"))
    _write_lora(str(lora_dir / "a.safetensors"), model, seed=1)
    _write_lora(str(lora_dir / "sub" / "b.safetensors"), model, seed=2)
    _write_lora(str(lora_dir / "xl.safetensors"), tiny_model("sdxl"), seed=3)
    shared.cmd_opts.lora_dir = str(lora_dir)
    shared.sd_model = model
    scripts.scripts_data.clear()
    script_callbacks.clear_callbacks()
    scripts.load_scripts_from(ROOT, os.path.join(ROOT, "tests", "host", "webui_scripts"))
    scripts.load_scripts_from(ROOT)
    script_callbacks.ui_settings_callback()
    script_callbacks.callback_map["callbacks_before_ui"][0]()
    with gr.Blocks():
        runner = scripts.ScriptRunner().initialize(is_img2img=False)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    yield dict(home=home, lora_dir=lora_dir, model=model, runner=runner, snap=snap)
    script_callbacks.script_unloaded_callback()


def _generate(webui, slots=None, script_args=None, **kw):
    from modules import processing

    runner = webui["runner"]
    p = processing.StableDiffusionProcessingTxt2Img(**{**dict(sd_model=webui["model"], prompt="a cat", seed=5, steps=3,
                                                              width=64, height=64), **kw})
    p.scripts = runner
    args = script_args or runner.default_args()
    if slots is not None:
        script = runner.alwayson_scripts[0]
        args = list(args)
        args[script.args_from:script.args_from + len(slots)] = [s.to_dict() for s in slots]
    p.script_args = args
    return p, processing.process_images(p)


def _pixels(processed):
    return np.asarray(processed.images[0]).astype(np.int16)


def _bit_exact(webui):
    return all(torch.equal(v, webui["snap"][k]) for k, v in webui["model"].state_dict().items())


def test_slots_change_the_image_and_turning_them_off_restores_it(webui):
    _, plain = _generate(webui)
    p, with_lora = _generate(webui, [Slot(True, "a.safetensors", 0.8)])
    assert np.abs(_pixels(with_lora) - _pixels(plain)).max() > 2
    h = _addnet_hash(str(webui["lora_dir"] / "a.safetensors"))[:12]
    assert p.extra_generation_params["AddNet Model 1"] == f"a({h})"
    assert p.extra_generation_params["AddNet Weight A 1"] == "0.8"
    assert f"AddNet Model 1: a({h})" in with_lora.info
    _, again = _generate(webui)
    assert np.array_equal(_pixels(again), _pixels(plain))
    assert _bit_exact(webui)


def test_infotext_pastes_back_into_the_same_slots(webui):
    from modules import infotext_utils

    runner = webui["runner"]
    slots = [Slot(True, "a.safetensors", 0.7), Slot(), Slot(True, "sub/b.safetensors", separate=True, unet=1.2, te=-0.5)]
    _, processed = _generate(webui, slots)
    assert "AddNet Module 1" in [key for _, key in runner.infotext_fields]     # the built-in leaves these to us
    pasted = _paste(runner, infotext_utils.parse_generation_parameters(processed.info))
    for want, got in zip(slots + [Slot()] * 2, pasted):
        assert (got.active, got.model, got.weights) == (want.active, want.model if want.active else got.model, want.weights)
    _generate(webui)
    assert _bit_exact(webui)


def _paste(runner, params):
    from modules import infotext_utils

    values = infotext_utils.paste_values(runner.infotext_fields, params)
    slots = []
    for i in range(5):
        eid = f"lora_ext_txt2img_slot{i + 1}_"
        by_field = {c.elem_id[len(eid):]: v for c, v in values.items() if (c.elem_id or "").startswith(eid)}
        defaults = Slot().to_dict()
        slots.append(Slot(*[by_field.get(f, defaults[f]) for f in ("enabled", "model", "weight", "separate", "unet", "te")]))
    return slots


def test_paste_finds_a_renamed_file_by_hash_and_reads_old_extension_text(webui):
    from modules import infotext_utils

    h = _addnet_hash(str(webui["lora_dir"] / "sub" / "b.safetensors"))[:12]
    text = ("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, AddNet Enabled: True, "
            f"AddNet Module 1: LoRA, AddNet Model 1: old_name({h}), AddNet Weight A 1: 0.5, AddNet Weight B 1: 0.7")
    slot = _paste(webui["runner"], infotext_utils.parse_generation_parameters(text))[0]
    assert slot.active and slot.model == "sub/b.safetensors" and slot.weights == (0.5, 0.7) and slot.separate


def test_api_callers_pass_named_slot_fields(webui):
    runner = webui["runner"]
    args = runner.args_for_api({"additional networks": {"args": [
        {"enabled": True, "model": "sub/b.safetensors", "unet_weight": 1.0, "te_weight": 0.0}]}})
    p, _ = _generate(webui, script_args=args)
    assert p.extra_generation_params["AddNet Weight A 1"] == "1" and p.extra_generation_params["AddNet Weight B 1"] == "0"
    bad = runner.args_for_api({"additional networks": {"args": ["not a slot"]}})
    p, _ = _generate(webui, script_args=bad)
    assert any("a slot is given as a dict" in c for c in p.comments)
    _generate(webui)
    assert _bit_exact(webui)


def test_a_lora_for_another_architecture_warns_and_leaves_the_image(webui):
    _, plain = _generate(webui)
    p, processed = _generate(webui, [Slot(True, "xl.safetensors", 1.0)])
    assert np.array_equal(_pixels(processed), _pixels(plain))
    assert any("LoRA for SDXL, the model is SD1" in c for c in p.comments)
    assert "AddNet Warning" in p.extra_generation_params and "AddNet Model 1" not in p.extra_generation_params
    p, _ = _generate(webui, [Slot(True, "../../outside.safetensors", 1.0)])
    assert any("not in the LoRA folders" in c for c in p.comments)
    assert _bit_exact(webui)


def test_xyz_axes_override_a_slot(webui):
    from modules import scripts

    xyz = next(d.module for d in scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py")
    axes = {a.label: a for a in xyz.axis_options}
    assert {"[AddNet] Model 1", "[AddNet] Weight 1", "[AddNet] UNet Weight 5", "[AddNet] TEnc Weight 2"} <= set(axes)
    assert "sub/b.safetensors" in axes["[AddNet] Model 1"].choices()
    from modules import processing
    runner = webui["runner"]
    p = processing.StableDiffusionProcessingTxt2Img(sd_model=webui["model"], prompt="a cat", seed=5, steps=3, width=64, height=64)
    p.scripts, p.script_args = runner, runner.default_args()
    axes["[AddNet] Model 1"].apply(p, "a.safetensors", None)
    axes["[AddNet] Weight 1"].apply(p, 0.8, None)
    via_axes = processing.process_images(p)
    _, direct = _generate(webui, [Slot(True, "a.safetensors", 0.8)])
    assert np.array_equal(_pixels(via_axes), _pixels(direct))
    _generate(webui)
    assert _bit_exact(webui)


def test_routes_list_and_describe(webui):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from modules import script_callbacks

    app = FastAPI()
    script_callbacks.app_started_callback(None, app)
    client = TestClient(app)
    listed = client.get("/lora_ext/v1/loras").json()
    assert [x["name"] for x in listed] == ["a.safetensors", "sub/b.safetensors", "xl.safetensors"]
    assert listed[0]["hash"] == _addnet_hash(str(webui["lora_dir"] / "a.safetensors"))[:12]
    assert "SD1 · lora · rank 4 (alpha 4)" in listed[0]["info"] and "300 steps" in listed[0]["info"]
    one = client.get("/lora_ext/v1/loras/sub/b.safetensors").json()
    assert one["arch"] == "sd1" and one["rank"] == 4 and one["file"] == "sub/b.safetensors"
    escape = client.get("/lora_ext/v1/loras/..%2F..%2Fsecret.safetensors")     # reaches our check, not routing
    assert escape.status_code == 404 and "not in the LoRA folders" in escape.json()["detail"]


def test_settings_are_registered():
    from modules import shared

    for key in ("lora_ext_slots", "lora_ext_extra_dirs", "lora_ext_cache_mb", "lora_ext_mode"):
        assert shared.opts.data_labels[key].section == ("lora_ext", "LoRA (lora_ext)")


def test_extra_folder_setting(webui, tmp_path):
    from modules import shared

    shutil.copy(webui["lora_dir"] / "a.safetensors", tmp_path / "extra_one.safetensors")
    shared.opts.lora_ext_extra_dirs = str(tmp_path)
    try:
        p, _ = _generate(webui, [Slot(True, "extra_one.safetensors", 0.5)])
        assert p.extra_generation_params["AddNet Model 1"].startswith("extra_one(")
    finally:
        shared.opts.lora_ext_extra_dirs = ""
        _generate(webui)
    assert _bit_exact(webui)


def test_a_checkpoint_loaded_into_the_model_is_not_overwritten(webui):
    """After the webui loads other weights into the model (and calls on_model_loaded), turning the slots off
    must not write the old model's originals back."""
    from modules import script_callbacks

    model = webui["model"]
    _generate(webui, [Slot(True, "a.safetensors", 1.0)])
    other = {k: v.clone() for k, v in tiny_model("sd1").state_dict().items()}
    other = {k: v + 0.01 if v.is_floating_point() and k.endswith("weight") else v for k, v in other.items()}
    model.load_state_dict(other)
    script_callbacks.model_loaded_callback(model)
    _generate(webui)
    assert all(torch.equal(v, other[k]) for k, v in model.state_dict().items())
    model.load_state_dict(webui["snap"])
    script_callbacks.model_loaded_callback(model)


def test_training_runs_as_a_webui_job_on_the_original_weights(webui, tmp_path):
    from modules import call_queue, progress, scripts, shared

    from lora_ext import sample_data
    from lora_ext.train.config import TrainConfig

    data = sample_data.make_sample_dataset(str(tmp_path / "data"), per_concept=2)
    module = next(d.module for d in scripts.scripts_data if d.script_class.__name__ == "AdditionalNetworks")
    _generate(webui, [Slot(True, "a.safetensors", 1.0)])            # the panel's LoRA is merged now
    assert not _bit_exact(webui)
    seen = []

    def on_event(e):
        if e.kind == "step":
            seen.append((call_queue.queue_lock.locked(), shared.state.job, shared.state.sampling_step,
                         shared.state.textinfo, _bit_exact(webui), progress.current_task))
            if e.step == 3:
                shared.state.interrupt()
    cfg = TrainConfig(train_data_dir=data["train"], caption_extension=".txt", output_dir=str(tmp_path / "out"), output_name="job",
                      resolution="64", train_batch_size=2, max_train_steps=10, network_dim=4, mixed_precision="no")
    result = module.train_in_webui(cfg, on_event, task_id="task(lora1)")
    assert result.cancelled and result.steps == 3 and os.path.exists(result.lora_path)
    assert [s[5] for s in seen] == ["task(lora1)"] * 3       # the page's progress bar asks about this task
    assert progress.current_task is None and progress.finished_tasks[-1] == "task(lora1)"
    assert [s[:3] for s in seen] == [(True, "lora_ext training", k) for k in (1, 2, 3)]
    assert "step 3/10" in seen[-1][3]
    assert all(s[4] for s in seen)          # trained on the checkpoint's own weights, the panel's LoRA given back
    assert shared.state.job == "" and not call_queue.queue_lock.locked()
    assert _bit_exact(webui)


def test_the_tab_in_the_webui_estimates_under_the_lock_and_bakes(webui, tmp_path):
    from modules import call_queue, script_callbacks, scripts

    from lora_ext import sample_data
    from lora_ext.train.config import TrainConfig
    from lora_ext.ui import merge_tab, train_fields, train_tab

    module = next(d.module for d in scripts.scripts_data if d.script_class.__name__ == "AdditionalNetworks")
    ctx = module.tab_context()
    data = sample_data.make_sample_dataset(str(tmp_path / "data"), per_concept=2)
    values = train_fields.options_to_values(TrainConfig(train_data_dir=data["train"], resolution="64", network_dim=4))
    report, text = train_tab.check_dataset(ctx.host_fn, values, ctx.lock())
    assert report is not None and "Estimated memory: about **" in text and not call_queue.queue_lock.locked()
    assert _bit_exact(webui)

    with call_queue.queue_lock:                                     # a generation or training going
        assert merge_tab.bake(ctx.bake_fn, "a.safetensors") == (
            "**Cannot bake:** the model is busy (a generation or a training run); try again when it is done")
        assert "Estimated memory: not available (ModelBusy" in train_tab.check_dataset(ctx.host_fn, values, ctx.lock())[1]
    assert _bit_exact(webui)
    _generate(webui, [Slot(True, "sub/b.safetensors", 1.0)])         # a panel LoRA in place
    msg = merge_tab.bake(ctx.bake_fn, "a.safetensors:0.5:1")
    assert msg.startswith("Baked into the loaded model: a.safetensors") and not call_queue.queue_lock.locked()
    baked = {k: v.clone() for k, v in webui["model"].state_dict().items()}
    _generate(webui)                                                # no slots: the baked weights stay
    assert all(torch.equal(v, baked[k]) for k, v in webui["model"].state_dict().items()) and not _bit_exact(webui)
    webui["model"].load_state_dict(webui["snap"])                   # loading the checkpoint again undoes it
    script_callbacks.model_loaded_callback(webui["model"])
    assert _bit_exact(webui)


def test_ticking_separate_keeps_pasted_parts():
    """Found in the real webui: a pasted infotext with UNet 0.6 / TE 0.4 ticks Separate, whose change handler
    then overwrote both parts with the linked weight. By hand (parts alike) they start at the linked weight."""
    from lora_ext.panel.ui import _parts_shown

    _, unet, te = _parts_shown(True, 0.6, 0.6, 0.4)
    assert (unet["value"], te["value"]) == (0.6, 0.4) and unet["visible"] and te["visible"]
    weight, unet, te = _parts_shown(True, 0.7, 1.0, 1.0)
    assert (unet["value"], te["value"]) == (0.7, 0.7) and weight["visible"] is False
    weight, unet, te = _parts_shown(False, 0.7, 0.2, 0.3)
    assert weight["visible"] and not unet["visible"] and (unet["value"], te["value"]) == (0.2, 0.3)


def _png_text(array) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_masks_and_step_ranges_through_the_api_the_sampler_callback_and_xyz(webui):
    """API slots with base64 masks and step ranges: black = no LoRA, two LoRAs in two halves differ from
    either alone, a step range switches at its boundary through the webui's CFG denoiser callback (the
    schedule is in the image), X/Y/Z's Start axis, a bad mask skips its slot with a message."""
    from modules import scripts

    runner = webui["runner"]
    left = np.zeros((64, 64))
    left[:, :32] = 255

    def api(*slots):
        return runner.args_for_api({"additional networks": {"args": list(slots)}})
    _, plain = _generate(webui)
    _, black = _generate(webui, script_args=api({"enabled": True, "model": "a.safetensors", "te_weight": 0, "mask": _png_text(left * 0)}))
    assert np.array_equal(_pixels(black), _pixels(plain))
    p, two = _generate(webui, script_args=api(
        {"enabled": True, "model": "a.safetensors", "te_weight": 0, "mask": _png_text(left)},
        {"enabled": True, "model": "sub/b.safetensors", "te_weight": 0, "mask": _png_text(255 - left)}))
    assert p.extra_generation_params["AddNet Mask 1"].startswith("64x64 #")
    assert p.extra_generation_params["AddNet Mask 1"] != p.extra_generation_params["AddNet Mask 2"]
    _, only_a = _generate(webui, [Slot(True, "a.safetensors", separate=True, te=0)])
    assert np.abs(_pixels(two) - _pixels(plain)).max() > 2 and np.abs(_pixels(two) - _pixels(only_a)).max() > 2
    steps = dict(steps=4)
    _, late = _generate(webui, script_args=api({"enabled": True, "model": "a.safetensors", "te_weight": 0, "start": 0.5}), **steps)
    _, whole = _generate(webui, [Slot(True, "a.safetensors", separate=True, te=0)], **steps)
    _, none = _generate(webui, **steps)
    assert not np.array_equal(_pixels(late), _pixels(none)) and not np.array_equal(_pixels(late), _pixels(whole))
    xyz = next(d.module for d in scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py")
    axes = {a.label: a for a in xyz.axis_options}
    from modules import processing
    q = processing.StableDiffusionProcessingTxt2Img(sd_model=webui["model"], prompt="a cat", seed=5, steps=4, width=64, height=64)
    q.scripts, q.script_args = runner, api({"enabled": True, "model": "a.safetensors", "te_weight": 0})
    axes["[AddNet] Start 1"].apply(q, 0.5, None)
    assert np.array_equal(_pixels(processing.process_images(q)), _pixels(late))
    assert q.extra_generation_params["AddNet Start 1"] == "0.5"
    p, _ = _generate(webui, script_args=api({"enabled": True, "model": "a.safetensors", "mask": "bm90"},
                                            {"enabled": True, "model": "sub/b.safetensors", "start": 0.9, "stop": 0.1}))
    warning = p.extra_generation_params["AddNet Warning"]
    assert "slot 2: slot start 0.9 must be below its stop 0.1" in warning and "slot 1: skipped: the mask is not" in warning
    _generate(webui)
    assert _bit_exact(webui)


def test_a_model_of_no_family_we_apply_to_is_a_warning_for_active_slots_and_silence_otherwise(webui):
    """Forge also loads models lora_ext does not apply to (Flux ...): a generation with an active slot says
    so in its infotext and comments; one with none says nothing; neither raises."""
    import types

    from modules import shared

    script = webui["runner"].alwayson_scripts[0]
    defaults = webui["runner"].default_args()[script.args_from:script.args_to]
    active = [Slot(enabled=True, model="a.safetensors").to_dict()] + list(defaults[1:])
    other = types.SimpleNamespace()      # neither the webui's layout nor a Forge engine
    shared.sd_model = other
    try:
        said = {}
        for name, args in (("active", active), ("idle", defaults)):
            p = types.SimpleNamespace(comments={}, extra_generation_params={}, sd_model=other)
            script.process(p, *args)
            said[name] = (p.extra_generation_params, p.comments)
    finally:
        shared.sd_model = webui["model"]
    assert "is of no kind lora_ext works on" in said["active"][0]["AddNet Warning"]
    assert any("slots skipped" in c for c in said["active"][1])
    assert said["idle"] == ({}, {})
