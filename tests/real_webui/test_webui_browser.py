"""The real webui in headless Chromium: pasting an infotext into the panel, and training from the LoRA tab
(the webui's Interrupt as the cancel, then Resume), after a `<lora:>` generation."""
import glob
import json
import os
import re
import shutil

import pytest

from test_browser import CHROMIUM, _choose, _fill, _md, _shot, _tab, browser_page

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium and playwright: bash .ci/setup")


@pytest.fixture(scope="module")
def page(webui):
    with browser_page(webui) as page:
        yield page


def test_pasted_infotext_fills_the_panel_and_adds_no_lora_tags(webui, page, tmp_path):
    from playwright.sync_api import expect

    answer = webui.txt2img("a photo of a dog", [{"enabled": True, "model": "beta.safetensors", "unet": 0.6, "te": 0.4}])
    text = json.loads(answer["info"])["infotexts"][0]
    try:
        page.locator("#txt2img_prompt textarea").fill(text)
        page.locator("#txt2img_tools #paste").click()
        expect(page.locator("#txt2img_prompt textarea")).to_have_value("a photo of a dog", timeout=30_000)
        page.locator("#lora_ext_txt2img_panel").click()
        slot = "#lora_ext_txt2img_slot1"
        expect(page.locator(f"{slot}_enabled input")).to_be_checked(timeout=30_000)
        expect(page.locator(f"{slot}_model input")).to_have_value("beta.safetensors", timeout=30_000)
        expect(page.locator(f"{slot}_separate input")).to_be_checked()
        expect(page.locator(f"{slot}_unet input[type=number]")).to_have_value("0.6")
        expect(page.locator(f"{slot}_te input[type=number]")).to_have_value("0.4")
        assert "<lora:" not in page.locator("#txt2img_prompt textarea").input_value()
        _shot(page, tmp_path, "webui_1_pasted")
    except Exception:
        _shot(page, tmp_path, "webui_failed_paste")
        raise


def _subtab(page, name):
    # ours, inside the LoRA tab: the webui has a Train tab of its own
    page.locator("#tab_lora_ext .tab-nav button").filter(has_text=re.compile(rf"^\s*{name}\s*$")).first.click()


def _train_form(page, data, out_name, steps):
    for group in ("network", "optimizer_schedule", "samples_saving"):
        page.locator(f"#lora_ext_train_{group} .label-wrap").first.click()
    _fill(page, "train_data_dir", data)
    _fill(page, "output_name", out_name)
    for field, value in (("resolution", 64), ("max_train_epochs", 0), ("max_train_steps", steps), ("network_dim", 4), ("network_alpha", 2),
                         ("learning_rate", 1e-3), ("train_batch_size", 1)):
        _fill(page, field, value)


def test_train_in_the_tab_interrupt_and_resume(webui, work, page, tmp_path):
    from playwright.sync_api import expect

    from lora_ext import sample_data

    data = sample_data.make_sample_dataset(str(tmp_path / "data"), per_concept=2)
    webui.txt2img("a photo of a cat <lora:alpha:1>")     # the built-in leaves alpha's deltas in the weights
    weights_before = webui.weights()
    try:
        page.goto(webui.url, timeout=120_000)
        _tab(page, "LoRA")
        _subtab(page, "Train")
        expect(_md(page, "lora_ext_train_model")).to_contain_text("tiny", timeout=60_000)
        # our style.css is served by the webui: the never-ending progress poll leaves no "pending" frame
        frame = page.evaluate("() => getComputedStyle(document.querySelector('#lora_ext_train_loss > .wrap')).borderTopColor")
        assert frame in ("rgba(0, 0, 0, 0)", "transparent"), frame
        _train_form(page, data["train"], "tabrun", 400)
        page.locator("#lora_ext_train_start").click()
        expect(_md(page, "lora_ext_train_status")).to_contain_text(re.compile(r"Step \d+/400"), timeout=180_000)
        _shot(page, tmp_path, "webui_2_training")
        webui.post("/sdapi/v1/interrupt", {})       # what the webui's Interrupt button sends
        expect(_md(page, "lora_ext_train_status")).to_contain_text("Resume from", timeout=180_000)
        status = _md(page, "lora_ext_train_status").inner_text()
        state = re.search(r"Resume from\s+(\S+?-state)", status).group(1)
        assert os.path.isfile(os.path.join(state, "state.json"))
        # the state is not in models/Lora, where both LoRA lists would offer it
        assert not glob.glob(os.path.join(work["loras"], "**", "*state*"), recursive=True)
        stopped_at = json.load(open(os.path.join(state, "state.json")))["step"]
        assert 0 < stopped_at < 400
        _fill(page, "max_train_steps", stopped_at + 3)
        _fill(page, "resume", state)
        page.locator("#lora_ext_train_start").click()
        expect(_md(page, "lora_ext_train_status")).to_contain_text(f"after {stopped_at + 3} steps", timeout=300_000)
        _shot(page, tmp_path, "webui_3_resumed")
    except Exception:
        _shot(page, tmp_path, "webui_failed_train")
        raise
    log = webui.log()
    assert "Stopped by an error" not in status and "Traceback" not in log, log[-3000:]
    assert os.path.isfile(os.path.join(work["loras"], "tabrun.safetensors"))
    # the host as found: the built-in's deltas are back in the weights (it gives them back on its next use)
    assert webui.weights() == weights_before
    listed = [item["name"] for item in webui.get("/lora_ext/v1/loras")]
    assert "tabrun.safetensors" in listed and not any("state" in n for n in listed)
    shutil.rmtree(state)
    # the file records the checkpoint it was trained on, as kohya does, and every key fits the model
    report = webui.get("/lora_ext/v1/loras/tabrun.safetensors")
    meta = report["metadata"]
    import hashlib
    with open(os.path.join(work["checkpoints"], "tiny.safetensors"), "rb") as f:
        raw = f.read()
    assert meta["ss_sd_model_name"] == "tiny.safetensors"
    assert str(meta["ss_new_sd_model_hash"]) == hashlib.sha256(raw).hexdigest()
    assert str(meta["ss_sd_model_hash"]) == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    assert report["unmatched"] == []
    # up-matrices still exactly zero (issue 9, item 8): only the mid block's self-attention q/k, whose 1x1
    # latent at 64 px is a single token: softmax over one key is 1 whatever q and k are, so their gradient
    # is exactly 0 under the webui's attention (not a bug; at larger sizes they train)
    from lora_ext import files
    lora = files.read(os.path.join(work["loras"], "tabrun.safetensors"))
    zero = {n for n, m in lora.modules.items() if not m.parts["lora_up.weight"].any()}
    assert zero <= {f"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_{p}" for p in "qk"}, zero


def test_merge_in_the_tab_then_switch_to_the_merged_checkpoint(webui, work, page, tmp_path):
    """Merge alpha at 0.6 into a new checkpoint (its yaml beside it), load it from the Train tab's switch:
    its plain generation equals the panel's alpha at 0.6 on the base. Then the base again, bit-exact."""
    from playwright.sync_api import expect

    webui.txt2img("a photo of a cat")
    base_weights = webui.weights()
    plain = webui.latents()
    webui.txt2img("a photo of a cat", [{"enabled": True, "model": "alpha.safetensors", "weight": 0.6}])
    panel = webui.latents()
    webui.txt2img("a photo of a cat")
    try:
        page.goto(webui.url, timeout=120_000)
        _tab(page, "LoRA")
        _subtab(page, "Merge")
        _choose(page, "lora_ext_merge_base", "tiny.safetensors", refresh="lora_ext_merge_refresh")
        _choose(page, "lora_ext_merge_pick", "alpha.safetensors", refresh="lora_ext_merge_refresh")
        page.locator("#lora_ext_merge_pick_unet input").fill("0.6")
        page.locator("#lora_ext_merge_pick_te input").fill("0.6")
        page.locator("#lora_ext_merge_add").click()
        expect(page.locator("#lora_ext_merge_loras textarea")).to_have_value("alpha.safetensors:0.6:0.6")
        page.locator("#lora_ext_merge_out textarea").fill("tiny_alpha")
        page.locator("#lora_ext_merge_precision label").filter(has_text="fp32").click()
        page.locator("#lora_ext_merge_go").click()
        expect(_md(page, "lora_ext_merge_message")).to_contain_text(
            "Wrote tiny_alpha.safetensors and its config tiny_alpha.yaml", timeout=120_000)
        _shot(page, tmp_path, "webui_4_merged")
        _subtab(page, "Train")
        _choose(page, "lora_ext_train_ckpt", "tiny_alpha", refresh="lora_ext_train_ckpt_refresh")
        page.locator("#lora_ext_train_ckpt_load").click()
        expect(_md(page, "lora_ext_train_model")).to_contain_text("tiny_alpha", timeout=120_000)
        _shot(page, tmp_path, "webui_5_switched")
    except Exception:
        _shot(page, tmp_path, "webui_failed_merge")
        raise
    assert "tiny_alpha" in webui.get("/probe/weights")["checkpoint"]
    webui.txt2img("a photo of a cat")
    merged = webui.latents()
    gap, effect = (merged - panel).abs().max().item(), (panel - plain).abs().max().item()
    assert effect > 1e-2 and gap < 1e-3 * max(1.0, effect), (gap, effect)
    # switched back the webui's own way (its settings, as its checkpoint dropdown does): the Train tab's
    # label follows on the next page load and on Check dataset, not the one it was built with
    webui.post("/sdapi/v1/options", {"sd_model_checkpoint": "tiny.safetensors"})
    assert webui.weights() == base_weights
    page.goto(webui.url, timeout=120_000)
    _tab(page, "LoRA")
    _subtab(page, "Train")
    expect(_md(page, "lora_ext_train_model")).to_contain_text("tiny.safetensors", timeout=60_000)
    webui.post("/sdapi/v1/options", {"sd_model_checkpoint": "tiny_alpha.safetensors"})
    page.locator("#lora_ext_train_check").click()
    expect(_md(page, "lora_ext_train_model")).to_contain_text("tiny_alpha", timeout=60_000)
    webui.post("/sdapi/v1/options", {"sd_model_checkpoint": "tiny.safetensors"})
    assert webui.weights() == base_weights
    assert "Traceback" not in webui.log()


def test_compare_a_run_in_the_tab_through_the_webuis_own_txt2img(webui, work, page, tmp_path):
    """A run's two saves x two weights in the Compare sub-tab: each cell is what the webui's txt2img gives
    with that save in our panel's slot (the same seed), the index holds the webui's infotext, and the weights
    come back bit-exact."""
    import base64
    import io

    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect

    shutil.copy(os.path.join(work["loras"], "alpha.safetensors"), os.path.join(work["loras"], "cmp-000001.safetensors"))
    shutil.copy(os.path.join(work["loras"], "beta.safetensors"), os.path.join(work["loras"], "cmp.safetensors"))
    webui.txt2img("a photo of a cat")
    before = webui.weights()
    try:
        page.goto(webui.url, timeout=120_000)
        _tab(page, "LoRA")
        _subtab(page, "Compare")
        _choose(page, "lora_ext_compare_run", "cmp", refresh="lora_ext_compare_refresh")
        page.locator("#lora_ext_compare_prompts textarea").fill("a photo of a cat")
        page.locator("#lora_ext_compare_weights textarea").fill("0.5, 1")
        for field, value in (("seed", 3), ("steps", 2), ("size", 64)):
            box = page.locator(f"#lora_ext_compare_{field} input")
            box.fill(str(value))
            box.press("Tab")
        page.locator("#lora_ext_compare_go").click()
        expect(_md(page, "lora_ext_compare_message")).to_contain_text("4 images in", timeout=180_000)
        _shot(page, tmp_path, "webui_6_compared")
        said = _md(page, "lora_ext_compare_message").inner_text()
    except Exception:
        _shot(page, tmp_path, "webui_failed_compare")
        raise
    folder = re.search(r"in\s+(\S+lora_ext_compare\S+?)\s+\(", said).group(1)
    index = json.load(open(os.path.join(folder, "index.json")))
    assert [c["label"] for c in index["cells"]] == ["epoch 1", "epoch 1", "final", "final"]
    cell = index["cells"][1]
    assert "Steps: 2" in cell["infotext"] and "Seed: 3" in cell["infotext"] and "AddNet Model 1: cmp-000001(" in cell["infotext"]
    assert webui.weights() == before
    answer = webui.txt2img("a photo of a cat", [{"enabled": True, "model": "cmp-000001.safetensors", "weight": 1}],
                           steps=2, seed=3, cfg_scale=7.0, sampler_name="Euler")
    direct = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0].split(",", 1)[-1]))).convert("RGB"))
    grid = np.asarray(Image.open(os.path.join(folder, "prompt_01.png")))
    assert np.array_equal(grid[34 + 64: 34 + 128, 72: 72 + 64], direct)        # row weight 1, column epoch 1
    webui.txt2img("a photo of a cat")
    assert webui.weights() == before
    assert "Traceback" not in webui.log()
