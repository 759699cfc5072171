"""scripts/ against our double of the webui's `modules`: the extension loads, registers its tab and panel,
builds its UI, and pays nothing heavy at start-up; install.py follows the webui's convention."""
import os
import runpy
import shutil
import subprocess
import sys
import types

import gradio as gr
import pytest

from conftest import ROOT

NEEDS_NODE = pytest.mark.skipif(shutil.which("node") is None,
                                reason="needs Debian's nodejs: run `bash .ci/setup` as root")


def test_scripts_register_tab_and_panel():
    from modules import script_callbacks, scripts

    script_callbacks.clear_callbacks()
    added = scripts.load_scripts_from(ROOT)
    assert [d.script_class.__name__ for d in added] == ["AdditionalNetworks"]

    tabs = script_callbacks.ui_tabs_callback()
    assert len(tabs) == 1
    block, title, elem_id = tabs[0]
    assert isinstance(block, gr.Blocks) and title == "LoRA" and elem_id == "lora_ext"

    for is_img2img in (False, True):
        with gr.Blocks():
            script = scripts.create_alwayson_script(added[0], is_img2img)
        assert script is not None and script.alwayson
        assert script.name == "additional networks"     # what API callers put in alwayson_scripts
        assert isinstance(script.controls, list)


def test_loading_the_extension_imports_no_heavy_package():
    code = (
        "import sys; sys.path[:0] = [%r, %r]\n"
        "from modules import scripts\n"
        "scripts.load_scripts_from(%r)\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'safetensors.torch', 'open_clip') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    ) % (ROOT, os.path.join(ROOT, "tests", "host"), ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def _run_install(installed):
    calls = []
    launch = types.ModuleType("launch")
    launch.is_installed = lambda name: name in installed
    launch.run_pip = lambda args, desc=None: (calls.append(args), installed.add(args.split()[-1]))
    sys.modules["launch"] = launch
    try:
        runpy.run_path(os.path.join(ROOT, "install.py"), run_name="__main__")
    finally:
        del sys.modules["launch"]
    return calls


def test_install_installs_only_what_is_missing_and_never_torch():
    installed = set()
    first = _run_install(installed)
    assert first and all("torch" not in c for c in first)
    assert _run_install(installed) == []          # a second run installs nothing
    assert _run_install({"safetensors", "tomli"}) == []


def test_inspect_handler_reports_a_message_never_a_traceback(tmp_path):
    from lora_ext.ui.inspect_tab import inspect_file

    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00")
    message, blocks, settings, tags, report = inspect_file(str(tmp_path), "broken.safetensors")
    assert report is None and blocks == [] and "Cannot read it" in message and "too short" in message
    message, *_, report = inspect_file(str(tmp_path), "../outside.safetensors")
    assert report is None and "outside the models folder" in message


def test_tab_glue_switches_checkpoints_and_refreshes_the_webui_lists(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from lora_ext import tiny
    from modules import call_queue, script_callbacks, scripts, sd_models, shared

    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    model = tiny.build("sd1")
    tiny.save_checkpoint(model, str(ckpts / "a.safetensors"))
    b = load_file(str(ckpts / "a.safetensors"))
    key = next(k for k in b if k.startswith("cond_stage_model.") and k.endswith("q_proj.weight"))
    b[key] = b[key] + 1
    save_file(b, str(ckpts / "b.safetensors"))
    saved = (shared.cmd_opts.ckpt_dir, shared.sd_model, shared.interrogator, sys.modules.get("networks"))
    shared.cmd_opts.ckpt_dir, shared.sd_model = str(ckpts), model
    refreshed = []
    sys.modules["networks"] = types.SimpleNamespace(list_available_networks=lambda: refreshed.append(1))
    shared.interrogator = types.SimpleNamespace(interrogate=lambda image: "a photo")
    try:
        script_callbacks.clear_callbacks()
        glue = scripts.load_scripts_from(ROOT)[0].module
        ctx = glue.tab_context()
        assert ctx.checkpoints_fn() == ["a.safetensors", "b.safetensors"]
        with ctx.lock():
            assert call_queue.queue_lock.locked()
            with pytest.raises(glue.ModelBusy, match="the model is busy"):
                with ctx.lock():
                    pass
        assert not call_queue.queue_lock.locked()
        assert "none loaded" in ctx.model_label_fn()
        assert ctx.switch_fn("b.safetensors") == "Loaded **b.safetensors**."
        assert torch.equal(model.state_dict()[key.replace("cond_stage_model.", "cond_stage_model.wrapped.")], b[key])
        assert "**b.safetensors**" in ctx.model_label_fn() and shared.opts.sd_model_checkpoint == "b.safetensors"
        assert "No checkpoint 'zz'" in ctx.switch_fn("zz")
        save_file(b, str(ckpts / "merged.safetensors"))
        assert "merged.safetensors" not in sd_models.checkpoint_tiles()
        ctx.on_written("checkpoint", str(ckpts / "merged.safetensors"))
        assert "merged.safetensors" in sd_models.checkpoint_tiles()
        ctx.on_written("lora", "x.safetensors")
        ctx.session.on_written("lora", "y.safetensors")
        assert refreshed == [1, 1]
        assert list(ctx.interrogators) == ["CLIP"] and ctx.interrogators["CLIP"](None) == "a photo"
    finally:
        shared.cmd_opts.ckpt_dir, shared.sd_model, shared.interrogator, networks = saved
        sys.modules.pop("networks")
        if networks is not None:
            sys.modules["networks"] = networks


def test_hints_file_is_generated_from_the_form():
    from lora_ext.ui import hints, train_fields

    with open(os.path.join(ROOT, "javascript", "lora_ext_hints.js"), encoding="utf-8") as f:
        assert f.read() == hints.render_js(), "regenerate: python -m lora_ext.ui.hints > javascript/lora_ext_hints.js"
    titles = hints.titles()
    assert all(titles[f.label] == f.tip for f in train_fields.FIELDS)


@NEEDS_NODE
def test_hints_register_as_the_webuis_own_and_keep_them():
    import json

    from lora_ext.ui import hints

    path = os.path.join(ROOT, "javascript", "lora_ext_hints.js")
    # as the webui runs it: after its hints.js defined `titles`, with onUiLoaded available
    script = ("var titles = {'Seed': 'the webui\\'s own'}; var later = [];"
              "function onUiLoaded(f) { later.push(f); }"
              f"eval(require('fs').readFileSync({json.dumps(path)}, 'utf8'));"
              "later.forEach(f => f()); console.log(JSON.stringify(titles));")
    out = json.loads(subprocess.run([shutil.which("node"), "-e", script], capture_output=True, text=True,
                                    check=True).stdout)
    titles = hints.titles()
    assert out["Seed"] == "the webui's own" and out["Network alpha"] == titles["Network alpha"]
    assert len(out) == len(titles)


@NEEDS_NODE
def test_train_button_script_hands_the_run_a_task_for_the_webuis_progress_bar():
    import json

    node = shutil.which("node")
    path = os.path.join(ROOT, "javascript", "lora_ext_progress.js")
    script = ("var calls = []; function randomId() { return 'task(abc)'; }"
              "function requestProgress(id, box, gallery, atEnd) { calls.push([id, box.id, gallery]); }"
              "function gradioApp() { return {getElementById: (id) => ({id: id})}; }"
              f"eval(require('fs').readFileSync({json.dumps(path)}, 'utf8'));"
              "const out = loraExtTrain('', 'a', 3);"
              "console.log(JSON.stringify([out, calls]));")
    out, calls = json.loads(subprocess.run([node, "-e", script], capture_output=True, text=True, check=True).stdout)
    assert out == ["task(abc)", "a", 3] and calls == [["task(abc)", "lora_ext_train_progress", None]]
    bare = (f"eval(require('fs').readFileSync({json.dumps(path)}, 'utf8'));"
            "console.log(JSON.stringify(loraExtTrain('', 'a')));")     # outside the webui: the inputs as they are
    assert json.loads(subprocess.run([node, "-e", bare], capture_output=True, text=True, check=True).stdout) == ["", "a"]
