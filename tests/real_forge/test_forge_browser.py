"""The real Forge in headless Chromium: the LoRA tab under Forge's gradio 4.40. Merge into a checkpoint from
the tab, load it through Forge's options: it equals the panel at that weight on the base, and the base comes
back bit-exact. Training from the tab on Forge's loaded model: the new LoRA in the panel equals `<lora:>`; a
run cancelled from the tab and resumed finishes with its previews and loss plot, Forge's weights as they were
after each."""
import re

import pytest

from test_browser import CHROMIUM, _choose, _fill, _shot, _tab, browser_page

from . import harness

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium and playwright: bash .ci/setup")


@pytest.fixture(scope="module")
def page(forge):
    with browser_page(forge) as page:
        yield page


def _subtab(page, name):
    page.locator("#tab_lora_ext button").filter(has_text=re.compile(rf"^\s*{name}\s*$")).first.click()


def _message(page, eid):
    return page.locator(f"#{eid}")


def test_merge_in_the_tab_equals_the_panel_and_loads_in_forge(forge, page, tmp_path):
    from playwright.sync_api import expect

    forge.txt2img("a photo of a cat")
    plain, base_weights = forge.latents(), forge.weights()
    forge.txt2img("a photo of a cat", [{"enabled": True, "model": harness.LORA, "weight": 0.6}])
    panel = forge.latents()
    try:
        _tab(page, "LoRA")
        _subtab(page, "Merge")
        _choose(page, "lora_ext_merge_base", harness.CHECKPOINT, refresh="lora_ext_merge_refresh")
        _choose(page, "lora_ext_merge_pick", harness.LORA, refresh="lora_ext_merge_refresh")
        page.locator("#lora_ext_merge_pick_unet input").fill("0.6")
        page.locator("#lora_ext_merge_pick_te input").fill("0.6")
        page.locator("#lora_ext_merge_add").click()
        expect(page.locator("#lora_ext_merge_loras textarea")).to_have_value(f"{harness.LORA}:0.6:0.6")
        page.locator("#lora_ext_merge_out textarea").fill("forge_alpha")
        page.locator("#lora_ext_merge_precision label").filter(has_text="fp32").click()
        page.locator("#lora_ext_merge_go").click()
        expect(_message(page, "lora_ext_merge_message")).to_contain_text("Wrote forge_alpha.safetensors",
                                                                          timeout=120_000)
        page.locator("#lora_ext_merge_bake").click()
        expect(_message(page, "lora_ext_merge_message")).to_contain_text("Bake is not available on this model",
                                                                          timeout=60_000)
        _shot(page, tmp_path, "forge_1_merged")
    except Exception:
        _shot(page, tmp_path, "forge_failed_merge")
        raise
    assert forge.weights() == base_weights      # the refused bake changed nothing
    forge.post("/sdapi/v1/options", {"sd_model_checkpoint": "forge_alpha.safetensors"})
    answer = forge.txt2img("a photo of a cat")
    assert "Model: forge_alpha" in answer["info"]
    merged = forge.latents()
    gap, effect = (merged - panel).abs().max().item(), (panel - plain).abs().max().item()
    print(f"merged checkpoint against the panel at 0.6: gap {gap:.2e}, the LoRA's effect {effect:.2e}")
    assert effect > 1e-2 and gap < 1e-3 * max(1.0, effect), (gap, effect)
    forge.post("/sdapi/v1/options", {"sd_model_checkpoint": harness.CHECKPOINT})
    forge.txt2img("a photo of a cat")
    assert (forge.latents() - plain).abs().max() == 0 and forge.weights() == base_weights
    assert "Traceback" not in forge.log()


def test_train_in_the_tab_on_forges_model_then_the_new_lora_in_the_panel_equals_the_builtin(forge, forge_work, page,
                                                                                              tmp_path):
    """Training from the LoRA tab on the model Forge has loaded (after a built-in `<lora:>` generation, whose
    patches Forge keeps merged): 4 steps, the new file in Forge's LoRA folder, Forge's weights after the run
    as they were after that generation (Forge merged them again), that generation repeated gives the same
    latents, and the new LoRA through the panel equals `<lora:>` with it."""
    train_then_compare(forge, forge_work, page, tmp_path, harness.LORA, "forgerun")


def test_cancel_and_resume_in_the_tab_on_forge_with_previews(forge, forge_work, page, tmp_path):
    import json
    import os

    from playwright.sync_api import expect

    from lora_ext import sample_data

    data = sample_data.make_sample_dataset(str(tmp_path / "data"), per_concept=2)
    forge.txt2img("a photo of a cat")
    before = forge.weights()
    try:
        _train_form(forge, page, data["train"], "forgestop", max_train_steps=400, learning_rate=1e-3,
                    sample_every_n_steps=2, sample_prompts="a red circle --w 64 --h 64 --s 2")
        page.locator("#lora_ext_train_start").click()
        expect(_message(page, "lora_ext_train_status")).to_contain_text(re.compile(r"Step \d+/400"), timeout=300_000)
        page.locator("#lora_ext_train_cancel").click()
        expect(_message(page, "lora_ext_train_status")).to_contain_text("Resume from", timeout=300_000)
        status = _message(page, "lora_ext_train_status").inner_text()
        state = re.search(r"Resume from\s+(\S+?-state)", status).group(1)
        stopped_at = json.load(open(os.path.join(state, "state.json")))["step"]
        assert 0 < stopped_at < 400 and forge.weights() == before
        _fill(page, "max_train_steps", stopped_at + 2)
        _fill(page, "resume", state)
        page.locator("#lora_ext_train_start").click()
        expect(_message(page, "lora_ext_train_status")).to_contain_text(f"after {stopped_at + 2} steps",
                                                                        timeout=300_000)
        page.locator("#lora_ext_train_refresh").click()
        expect(page.locator("#lora_ext_train_samples img").first).to_be_visible(timeout=60_000)
        expect(page.locator("#lora_ext_train_loss img").first).to_be_visible(timeout=60_000)
        _shot(page, tmp_path, "forge_resumed")
    except Exception:
        _shot(page, tmp_path, "forge_failed_resume")
        raise
    assert os.path.isfile(os.path.join(forge_work["loras"], "forgestop.safetensors"))
    assert forge.weights() == before and "Traceback" not in forge.log()


def _train_form(forge, page, train_dir: str, output_name: str, **fields) -> None:
    """The LoRA tab opened afresh, its groups unfolded, a small run's options filled in (`fields` on top)."""
    page.goto(forge.url, timeout=120_000)
    page.locator("#txt2img_prompt textarea").wait_for(timeout=120_000)
    _tab(page, "LoRA")
    for group in ("network", "optimizer_schedule", "samples_saving"):
        page.locator(f"#lora_ext_train_{group} .label-wrap").first.click()
    _fill(page, "train_data_dir", train_dir)
    _fill(page, "output_name", output_name)
    options = {"resolution": 64, "max_train_epochs": 0, "network_dim": 4, "network_alpha": 2, "train_batch_size": 1,
               **fields}
    for field, value in options.items():
        _fill(page, field, value)


def train_then_compare(forge, forge_work, page, tmp_path, builtin: str, output_name: str) -> None:
    """train_in_tab's run after a generation with `builtin` through `<lora:>`, and its checks."""
    import os

    from playwright.sync_api import expect

    from lora_ext import sample_data

    data = sample_data.make_sample_dataset(str(tmp_path / "data"), per_concept=2)
    forge.txt2img(f"a photo of a cat <lora:{builtin[:-12]}:1>")
    before, builtin_before = forge.weights(), forge.latents()
    try:
        _train_form(forge, page, data["train"], output_name, max_train_steps=4, learning_rate=1e-2)
        page.locator("#lora_ext_train_start").click()
        # the tab shows the last run's status when it opens: wait for this run's file
        expect(_message(page, "lora_ext_train_status")).to_contain_text(
            re.compile(rf"Finished.*{output_name}\.safetensors"), timeout=300_000)
        _shot(page, tmp_path, f"forge_trained_{output_name}")
    except Exception:
        _shot(page, tmp_path, f"forge_failed_train_{output_name}")
        raise
    status = _message(page, "lora_ext_train_status").inner_text()
    assert "after 4 steps" in status, status
    assert os.path.isfile(os.path.join(forge_work["loras"], f"{output_name}.safetensors"))
    assert forge.weights() == before and "Traceback" not in forge.log()
    forge.txt2img(f"a photo of a cat <lora:{builtin[:-12]}:1>")
    assert (forge.latents() - builtin_before).abs().max() == 0
    forge.txt2img("a photo of a cat")
    plain = forge.latents()
    forge.txt2img(f"a photo of a cat <lora:{output_name}:0.7>")
    builtin_new = forge.latents()
    forge.txt2img("a photo of a cat", [{"enabled": True, "model": f"{output_name}.safetensors", "weight": 0.7}])
    ours = forge.latents()
    gap, effect = (ours - builtin_new).abs().max().item(), (builtin_new - plain).abs().max().item()
    print(f"trained on Forge ({output_name}), panel against <lora:{output_name}:0.7>: gap {gap:.2e}, "
          f"the LoRA's effect {effect:.2e}")
    assert effect > 1e-3 and gap < 1e-3 * max(1.0, effect), (gap, effect)
