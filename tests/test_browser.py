"""End to end in headless Chromium (Debian's chromium, driven by Playwright): the standalone tab served on
127.0.0.1; fill the training form, train on the sample dataset, watch progress and the loss plot, see the file,
run a merge. Screenshots go to the test's output folder (and tests/output/ when LORA_EXT_SCREENSHOTS is set).
`bash .ci/setup` installs chromium (as root) and playwright."""
import contextlib
import importlib.util
import os
import shutil
import time

import pytest

from conftest import serve_app
from lora_ext import sample_data

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None or importlib.util.find_spec("playwright") is None,
                                reason="needs Debian's chromium and playwright: run `bash .ci/setup` as root")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def browser_page(server):
    """Headless Chromium on a webui's (or Forge's) page, once its prompt box is there."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server.url, timeout=120_000)
        page.locator("#txt2img_prompt textarea").wait_for(timeout=120_000)
        yield page
        browser.close()


def _shot(page, tmp_path, name):
    print(f"{time.strftime('%H:%M:%S')} screenshot {name}")     # shown with a failure: how far it got, when
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("LORA_EXT_SCREENSHOTS"):
        os.makedirs(os.environ["LORA_EXT_SCREENSHOTS"], exist_ok=True)
        shutil.copy(path, os.path.join(os.environ["LORA_EXT_SCREENSHOTS"], f"{name}.png"))


def _md(page, eid):
    # gradio 3.41 gives a Markdown's elem_id to its wrapper and to the text itself
    return page.locator(f"div.prose#{eid}")


def _fill(page, field, value):
    box = page.locator(f"#lora_ext_train_{field} textarea, #lora_ext_train_{field} input").first
    box.fill(str(value))
    box.press("Tab")


def test_train_and_merge_in_a_real_browser(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    data = sample_data.make_sample_dataset(str(tmp_path / "data"), per_concept=2)
    block, ctx, port = serve_app(tmp_path / "work")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            try:
                _drive(page, port, ctx, data, tmp_path, expect)
            except Exception:
                _shot(page, tmp_path, "failed")     # where it stood, for the CI log's reader
                raise
            finally:
                browser.close()
    finally:
        # the tab's progress poll (every=2) is a queue job that never ends, and uvicorn's graceful shutdown
        # would wait for it: let the test's server go at once
        block.server.force_exit = True
        block.close()
    assert os.path.exists(os.path.join(ctx.ckpt_folder_fn(), "merged.safetensors"))


def _drive(page, port, ctx, data, tmp_path, expect):
    page.goto(f"http://127.0.0.1:{port}/", timeout=60_000)
    expect(page.locator("#lora_ext_train_start")).to_be_visible(timeout=60_000)
    for group in ("network", "optimizer_schedule", "samples_saving"):
        page.locator(f"#lora_ext_train_{group} .label-wrap").first.click()
    # the progress poll never ends for gradio: its "pending" frame must not stay on the polled boxes
    frame = page.evaluate("() => getComputedStyle(document.querySelector('#lora_ext_train_loss > .wrap')).borderTopColor")
    assert frame in ("rgba(0, 0, 0, 0)", "transparent"), frame
    _fill(page, "train_data_dir", data["train"])
    _fill(page, "output_dir", ctx.lora_folder_fn())
    _fill(page, "output_name", "browser")
    _fill(page, "resolution", "64")
    _fill(page, "network_dim", "4")
    _fill(page, "train_batch_size", "2")
    _fill(page, "max_train_epochs", "0")        # the steps count only without epochs (as in kohya)
    _fill(page, "max_train_steps", "6")
    _fill(page, "sample_every_n_epochs", "1")
    _fill(page, "sample_prompts", "red circle")
    _shot(page, tmp_path, "1_form")
    page.locator("#lora_ext_train_check").click()
    expect(_md(page, "lora_ext_train_message")).to_contain_text("6 steps", timeout=60_000)
    page.locator("#lora_ext_train_start").click()
    expect(_md(page, "lora_ext_train_message")).to_contain_text("Training started", timeout=60_000)
    expect(_md(page, "lora_ext_train_status")).to_contain_text("Step", timeout=120_000)
    _shot(page, tmp_path, "2_training")
    expect(_md(page, "lora_ext_train_status")).to_contain_text("Finished", timeout=180_000)
    expect(page.locator("#lora_ext_train_loss img")).to_be_visible(timeout=30_000)
    _shot(page, tmp_path, "3_finished")
    assert os.path.exists(os.path.join(ctx.lora_folder_fn(), "browser.safetensors"))

    _tab(page, "Merge")
    _choose(page, "lora_ext_merge_pick", "browser.safetensors", refresh="lora_ext_merge_refresh")
    _choose(page, "lora_ext_merge_base", "tiny-sd1.safetensors")
    page.locator("#lora_ext_merge_pick_unet input").fill("0.8")
    page.locator("#lora_ext_merge_add").click()
    expect(page.locator("#lora_ext_merge_loras textarea")).to_have_value("browser.safetensors:0.8:1")
    page.locator("#lora_ext_merge_out textarea").fill("merged")
    page.locator("#lora_ext_merge_go").click()
    expect(_md(page, "lora_ext_merge_message")).to_contain_text("Wrote merged.safetensors", timeout=120_000)
    _shot(page, tmp_path, "4_merged")

    _tab(page, "Concepts")
    # a kohya dataset TOML pasted in, imported into the table, laid out as N_name folders for the Train form
    from lora_ext import concepts as cp
    toml = cp.to_kohya_toml([cp.Concept(os.path.join(data["train"], "5_redcircle"), 3, "red")])
    page.locator("#lora_ext_concepts_text .cm-content").click()
    page.keyboard.insert_text(toml)
    page.locator("#lora_ext_concepts_import").click()
    expect(_md(page, "lora_ext_concepts_message")).to_contain_text("Imported 1 concepts", timeout=30_000)
    expect(_md(page, "lora_ext_concepts_summary")).to_contain_text("red (3 repeats): 2 images", timeout=30_000)
    prepared = str(tmp_path / "prepared")
    page.locator("#lora_ext_concepts_dest textarea").fill(prepared)
    page.locator("#lora_ext_concepts_prepare").click()
    expect(_md(page, "lora_ext_concepts_message")).to_contain_text("Prepared", timeout=30_000)
    assert os.path.isdir(os.path.join(prepared, "train", "3_red"))
    _shot(page, tmp_path, "5a_concepts")
    _tab(page, "Train")
    expect(page.locator("#lora_ext_train_train_data_dir textarea")).to_have_value(os.path.join(prepared, "train"))
    _tab(page, "Concepts")
    page.locator("#lora_ext_captions .label-wrap").first.click()
    red = os.path.join(data["train"], "5_redcircle")
    page.locator("#lora_ext_captions_folder textarea").fill(red)
    page.locator("#lora_ext_captions_show").click()
    expect(_md(page, "lora_ext_captions_message")).to_contain_text("2 images, 1 without caption", timeout=30_000)
    page.locator("#lora_ext_captions_gallery button.thumbnail-item").first.click()
    first = sorted(n for n in os.listdir(red) if not n.endswith(".txt"))[0]
    with open(os.path.join(red, os.path.splitext(first)[0] + ".txt")) as f:
        expect(page.locator("#lora_ext_captions_text textarea")).to_have_value(f.read().strip(), timeout=30_000)
    page.locator("#lora_ext_captions_text textarea").fill("edited in the browser")
    page.locator("#lora_ext_captions_save").click()
    expect(_md(page, "lora_ext_captions_message")).to_contain_text("Saved", timeout=30_000)
    with open(os.path.join(red, os.path.splitext(first)[0] + ".txt")) as f:
        assert f.read() == "edited in the browser"
    _shot(page, tmp_path, "5_captions")

    _tab(page, "Inspect")
    # empty tables before a file is chosen: headers, no stray "0" row
    import re
    for table in ("blocks", "settings", "tags"):
        text = page.locator(f"#lora_ext_inspect_{table}").inner_text()
        assert not re.search(r"\b0\b", text) and text.strip(), (table, text)
    _choose(page, "lora_ext_inspect_file", "browser.safetensors", refresh="lora_ext_inspect_refresh")
    expect(_md(page, "lora_ext_inspect_message")).to_contain_text("SD1 lora", timeout=30_000)
    expect(page.locator("#lora_ext_inspect_blocks")).to_contain_text("unet", timeout=30_000)
    expect(page.locator("#lora_ext_inspect_tags")).to_contain_text("circle", timeout=30_000)
    _shot(page, tmp_path, "6_inspect")

    # the webui's dark theme (its ?__theme=dark): our elements take the theme's colours, none of their own
    page.goto(f"http://127.0.0.1:{port}/?__theme=dark", timeout=60_000)
    expect(page.locator("#lora_ext_train_start")).to_be_visible(timeout=60_000)
    assert page.evaluate("document.body.classList.contains('dark')")
    colors = page.evaluate("""() => {
        const box = getComputedStyle(document.querySelector('#lora_ext_train_model_output'));
        const text = getComputedStyle(document.querySelector('#lora_ext_train_output_name label span'));
        return [box.backgroundColor, text.color];
    }""")
    assert _luminance(colors[0]) < 0.3 and _luminance(colors[1]) > 0.6, colors
    _shot(page, tmp_path, "7_dark")


def _luminance(css_color: str) -> float:
    r, g, b = (float(x) for x in css_color[css_color.index("(") + 1:].rstrip(")").split(",")[:3])
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


def _tab(page, name):
    import re
    page.locator(".tab-nav button").filter(has_text=re.compile(rf"^\s*{name}\s*$")).first.click()


def _choose(page, eid, option, refresh=None, timeout_s=60):
    """Opens a dropdown and picks an option. Its choices come from the `refresh` button's click, whose answer
    may still be on its way or (seen once in CI-like runs) lost: until the option is there, refresh again and
    reopen the dropdown."""
    deadline = time.time() + timeout_s
    while True:
        if refresh:
            page.locator(f"#{refresh}").click()
        page.locator(f"#{eid} input").click()
        item = page.locator("ul.options li", has_text=option).first
        try:
            item.wait_for(timeout=2_000)
            item.click()
            return
        except Exception:
            if time.time() > deadline:
                raise
            page.keyboard.press("Escape")
