"""The real webui 1.10.1 on a tiny SDXL checkpoint (sgm's DiffusionEngine, loaded from its yaml): the panel
against the built-in `<lora:>` with an SDXL LoCon (lora_te1_/lora_te2_, sgm UNet names), the weights back
bit-exact, and a LoRA trained on the loaded model from the LoRA tab, applied both ways."""
import os
import re

import pytest

from .harness import SDXL_CHECKPOINT, SDXL_LORA, SDXL_TYPES
from .test_webui_panel import _close, _slot

PROMPT = "a photo of a cat"
NAME = os.path.splitext(SDXL_LORA)[0]


def _gen(server, prompt=PROMPT, slots=None):
    server.txt2img(prompt, slots)
    return server.latents()


def test_the_webui_runs_the_tiny_sdxl(sdxl):
    log = sdxl.log()
    assert "Traceback" not in log, log[-4000:]
    assert SDXL_CHECKPOINT in (sdxl.get("/probe/weights")["checkpoint"] or "")
    assert _gen(sdxl).shape == (1, 4, 8, 8)


def test_sdxl_panel_equals_the_builtin_lora(sdxl):
    plain = _gen(sdxl)
    builtin = _gen(sdxl, f"{PROMPT} <lora:{NAME}:0.7>")
    _gen(sdxl)          # the built-in gives its weights back on its next use
    ours = _gen(sdxl, slots=[_slot(SDXL_LORA, 0.7)])
    _close(ours, builtin, plain)
    te_only = _gen(sdxl, slots=[_slot(SDXL_LORA, unet=0.0, te=0.7)])
    builtin_te = _gen(sdxl, f"{PROMPT} <lora:{NAME}:0.7:0>")
    _close(te_only, builtin_te, plain)      # both text encoders' LoRAs reach the SDXL conditioning


@pytest.mark.parametrize("network", SDXL_TYPES)
def test_sdxl_types_equal_the_builtin_lora(sdxl, network):
    """DoRA (with the open_clip text encoder's q/k/v row blocks of one in_proj_weight, each decomposed on its
    own rows, as the built-in does), LoHa and full/diff (biases, conv_in, the label embedding) on SDXL: the
    panel gives the latents `<lora:>` gives, and the weights come back bit-exact."""
    plain = _gen(sdxl)      # a <lora:> left by the test before is taken off by this plain use of the built-in
    before = sdxl.weights()
    builtin = _gen(sdxl, f"{PROMPT} <lora:xl_{network}:0.7>")
    _gen(sdxl)
    ours = _gen(sdxl, slots=[_slot(f"xl_{network}.safetensors", 0.7)])
    _close(ours, builtin, plain)
    _gen(sdxl)
    assert sdxl.weights() == before


def test_sdxl_weights_bit_exact_after_the_panel(sdxl):
    _gen(sdxl)
    before = sdxl.weights()
    _gen(sdxl, slots=[_slot(SDXL_LORA, 0.8)])
    assert sdxl.weights() != before
    _gen(sdxl)
    assert sdxl.weights() == before


@pytest.fixture(scope="module")
def page(sdxl):
    from test_browser import CHROMIUM

    from .test_webui_browser import browser_page

    if CHROMIUM is None:
        pytest.skip("needs Debian's chromium and playwright: bash .ci/setup")
    with browser_page(sdxl) as page:
        yield page


def test_train_sdxl_in_the_tab_and_apply_it_both_ways(sdxl, work, page, tmp_path):
    """Trained on the loaded SDXL from the LoRA tab (its own conditioning, a preview sample), the file is
    kohya's SDXL file for this checkpoint; the panel and the built-in apply it alike; the host comes back."""
    from playwright.sync_api import expect

    from lora_ext import files
    from lora_ext import sample_data
    from test_browser import _fill, _md, _shot, _tab
    from .test_webui_browser import _subtab, _train_form

    data = sample_data.make_sample_dataset(str(tmp_path / "data"), per_concept=2)
    _gen(sdxl)
    before = sdxl.weights()
    try:
        _tab(page, "LoRA")
        _subtab(page, "Train")
        expect(_md(page, "lora_ext_train_model")).to_contain_text("tiny_xl", timeout=60_000)
        _train_form(page, data["train"], "xlrun", 6)
        _fill(page, "network_args", "conv_dim=2")
        _fill(page, "sample_prompts", "a red cat")
        _fill(page, "sample_every_n_steps", 6)
        _fill(page, "text_encoder_lr", "1e-3, 5e-4")
        page.locator("#lora_ext_train_start").click()
        expect(_md(page, "lora_ext_train_status")).to_contain_text("after 6 steps", timeout=300_000)
        _shot(page, tmp_path, "webui_sdxl_trained")
    except Exception:
        _shot(page, tmp_path, "webui_sdxl_failed_train")
        raise
    log = sdxl.log()
    assert "Traceback" not in log, log[-3000:]
    assert sdxl.weights() == before
    path = os.path.join(work["loras"], "xlrun.safetensors")
    lora = files.read(path)
    assert lora.arch.name == "sdxl" and lora.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert lora.metadata["ss_sd_model_name"] == SDXL_CHECKPOINT
    assert {n.split("_")[1] for n in lora.modules} == {"te1", "te2", "unet"}
    assert sdxl.get("/lora_ext/v1/loras/xlrun.safetensors")["unmatched"] == []
    assert re.search(r"xlrun_e\d+_s000006_00\.png", " ".join(os.listdir(os.path.join(work["loras"], "samples"))))
    plain = _gen(sdxl)
    builtin = _gen(sdxl, f"{PROMPT} <lora:xlrun:1>")
    _gen(sdxl)
    ours = _gen(sdxl, slots=[_slot("xlrun.safetensors", 1.0)])
    # a 6-step LoRA is small: compare at its own scale
    effect = (builtin - plain).abs().max().item()
    assert effect > 0 and (ours - builtin).abs().max().item() < 1e-3 * max(effect, 1e-3) + 1e-6, effect
