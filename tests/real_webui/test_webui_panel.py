"""The real webui 1.10.1: start-up, the panel against the built-in `<lora:>`, exact restore, stacking,
infotext and the API routes, all through its HTTP API."""
import base64
import json
import re

import pytest

from . import harness

PROMPT = "a photo of a cat"


def _gen(webui, prompt=PROMPT, slots=None, **params):
    answer = webui.txt2img(prompt, slots, **params)
    return answer, webui.latents()


def _slot(model, weight=None, **parts):
    """A slot as an API caller sends it: one weight, or the UNet / text-encoder weights."""
    return {"enabled": True, "model": model, **({"weight": weight} if weight is not None else parts)}


def _close(a, b, reference):
    """a and b agree to well within how far `reference` is from them (the LoRA's own effect)."""
    effect = (a - reference).abs().max().item()
    gap = (a - b).abs().max().item()
    assert effect > 1e-2, f"the LoRA changes the latents by only {effect}"
    assert gap < 1e-3 * max(1.0, effect), f"differ by {gap} (the LoRA's effect is {effect})"


def test_startup_is_clean(webui, work):
    assert work["installer"].returncode == 0, work["installer"].stderr
    log = webui.log()
    assert "Traceback" not in log, log[-4000:]
    assert "Error loading script" not in log
    assert "additional networks" in webui.get("/sdapi/v1/scripts")["txt2img"]


def test_text_encoder_changes_reach_the_conditioning(webui):
    # the webui reuses the last prompt's conditioning unless its key changes; our LoRA is not in that key
    _, plain = _gen(webui)
    _, te_only = _gen(webui, slots=[_slot("beta.safetensors", unet=0.0, te=0.5)])
    _, builtin = _gen(webui, f"{PROMPT} <lora:beta:0.5:0>")
    _close(te_only, builtin, plain)
    _, again = _gen(webui)
    assert (again - plain).abs().max() < 1e-6


def test_panel_equals_the_builtin_lora(webui):
    _, plain = _gen(webui)
    _, builtin = _gen(webui, f"{PROMPT} <lora:alpha:0.7>")
    _, _ = _gen(webui)      # the built-in gives its weights back on its next use
    _, ours = _gen(webui, slots=[_slot("alpha.safetensors", 0.7)])
    _close(ours, builtin, plain)


def test_switches_sent_as_strings_mean_what_they_say(webui):
    """Through the API `"false"` is off: a slot `"enabled": "false"` leaves the image plain, `"separate":
    "false"` keeps the one weight; a switch that is neither is the slot's warning."""
    _, plain = _gen(webui)
    answer, off = _gen(webui, slots=[{"enabled": "false", "model": "alpha.safetensors", "weight": 0.7}])
    assert (off - plain).abs().max() == 0 and "AddNet Model 1" not in _infotext(answer)
    _, linked = _gen(webui, slots=[_slot("alpha.safetensors", 0.7)])
    answer, as_string = _gen(webui, slots=[{"enabled": "true", "model": "alpha.safetensors", "weight": 0.7,
                                            "separate": "false"}])
    assert (as_string - linked).abs().max() == 0 and "AddNet Weight A 1: 0.7" in _infotext(answer)
    answer, _ = _gen(webui, slots=[{"enabled": "maybe", "model": "alpha.safetensors"}])
    assert "slot enabled 'maybe' is not true or false" in _infotext(answer)
    _gen(webui)


def test_weights_bit_exact_after_the_panel_is_turned_off(webui):
    _gen(webui)
    before = webui.weights()
    _gen(webui, slots=[_slot("alpha.safetensors", 0.8)])
    assert webui.weights() != before
    _gen(webui, slots=[_slot("alpha.safetensors", 0.3), _slot("beta.safetensors", -0.5)])
    _gen(webui, slots=[{"enabled": False, "model": "alpha.safetensors", "weight": 0.3}])
    assert webui.weights() == before


def test_panel_stacks_with_the_builtin(webui):
    _, plain = _gen(webui, f"{PROMPT} <lora:beta:0.5>")
    _, both_builtin = _gen(webui, f"{PROMPT} <lora:alpha:0.6> <lora:beta:0.5>")
    _, mixed = _gen(webui, f"{PROMPT} <lora:beta:0.5>", slots=[_slot("alpha.safetensors", 0.6)])
    _close(mixed, both_builtin, plain)
    _gen(webui)


def test_medvram_panel_equals_the_builtin(medvram):
    _, plain = _gen(medvram)
    before = medvram.weights()
    _, builtin = _gen(medvram, f"{PROMPT} <lora:alpha:0.7>")
    _gen(medvram)
    _, ours = _gen(medvram, slots=[_slot("alpha.safetensors", 0.7)])
    _close(ours, builtin, plain)
    _gen(medvram)
    assert medvram.weights() == before


def _infotext(answer):
    return json.loads(answer["info"])["infotexts"][0]


def test_infotext_written_and_read_back_from_the_png(webui):
    answer, _ = _gen(webui, slots=[_slot("alpha.safetensors", unet=0.6, te=0.4)])
    text = _infotext(answer)
    assert re.search(r"AddNet Model 1: alpha\([0-9a-f]{12}\)", text), text
    assert "AddNet Weight A 1: 0.6" in text and "AddNet Weight B 1: 0.4" in text
    assert "<lora:" not in text
    png = "data:image/png;base64," + answer["images"][0].split(",", 1)[-1]
    read = webui.post("/sdapi/v1/png-info", {"image": png})
    assert read["parameters"]["AddNet Model 1"].startswith("alpha(")
    assert read["parameters"]["AddNet Weight B 1"] in ("0.4", 0.4)
    _gen(webui)


def test_block_weights_reach_the_blocks_and_the_infotext(webui):
    """A slot's `block_weights` through the API: BASE at 1 and every UNet block at 0 (26 values, the LoCon
    layout) gives the latents of the built-in's text-encoder-only `<lora:alpha:0.8:0>`; the vector is in the
    infotext and comes back from the PNG; the weights come back bit-exact."""
    _gen(webui)
    before = webui.weights()
    _, plain = _gen(webui)
    _, builtin = _gen(webui, f"{PROMPT} <lora:alpha:0.8:0>")
    _gen(webui)
    vector = "1" + ",0" * 25
    answer, ours = _gen(webui, slots=[{**_slot("alpha.safetensors", 0.8), "block_weights": vector}])
    assert "AddNet Warning" not in json.loads(answer["info"])["extra_generation_params"]
    _close(ours, builtin, plain)
    png = "data:image/png;base64," + answer["images"][0].split(",", 1)[-1]
    assert webui.post("/sdapi/v1/png-info", {"image": png})["parameters"]["AddNet Block Weights 1"] == vector
    answer, _ = _gen(webui, slots=[{**_slot("alpha.safetensors", 0.8), "block_weights": "1,2"}])
    assert "block weights '1,2': SD1/SD2 takes 17 or 26 values" in _infotext(answer)
    _gen(webui)
    assert webui.weights() == before


def test_xyz_plot_takes_block_weights_and_steps_per_slot(webui):
    """The webui's X/Y/Z plot script through its API: X = our slot's block weights (a preset and a quoted
    vector), Y = its start: every cell's infotext records what that cell applied; weights back bit-exact."""
    _gen(webui)
    before = webui.weights()
    index = lambda label: webui.get(f"/probe/xyz_index?label={label}")["index"]     # noqa: E731
    vector = "1" + ",0" * 16
    x_values, y_values = f'OUTALL, "{vector}"', "0, 0.5"
    args = [index("[AddNet] Block Weights 1"), x_values, [], index("[AddNet] Start 1"), y_values, [], 0, "", [],
            True, False, False, False, 0, 0, 0, 0, False]
    answer = webui.txt2img(PROMPT, [_slot("alpha.safetensors", 0.8)], script_name="x/y/z plot", script_args=args,
                           steps=2)
    cells = [t for t in json.loads(answer["info"])["infotexts"] if "AddNet Model 1" in t]
    assert len(cells) >= 4, cells
    seen = {(re.search(r"AddNet Block Weights 1: (\"[^\"]*\"|[^,]+)", t).group(1).strip('"'),
             (re.search(r"AddNet Start 1: ([^,]+)", t) or [None, "0"])[1]) for t in cells}
    assert {("OUTALL", "0"), ("OUTALL", "0.5"), (vector, "0"), (vector, "0.5")} <= seen, seen
    _gen(webui)
    assert webui.weights() == before


def _mask(left_white: bool, size=64) -> str:
    """A PNG, base64, white on the left half (or the right)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    pixels = np.zeros((size, size), np.uint8)
    pixels[:, : size // 2] = 255
    buf = io.BytesIO()
    Image.fromarray(pixels if left_white else 255 - pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_two_loras_in_two_regions_and_a_step_range(webui):
    """Two LoRAs, each masked to one half of the image (the reason people want masks), through the API:
    black masks give the plain latents exactly, a white one those of the unmasked LoRA; each half is nearer
    to its own LoRA's image; a step range (start 0.5 of 4 steps) switches through the webui's own sampler
    callback; masks and steps are in the infotext; the weights come back bit-exact."""
    _gen(webui)
    before = webui.weights()
    _, plain = _gen(webui, steps=4)
    unet_only = lambda model, **kw: {**_slot(model, unet=1.0, te=0.0), **kw}     # noqa: E731
    _, whole = _gen(webui, slots=[unet_only("alpha.safetensors")], steps=4)
    _, white = _gen(webui, slots=[unet_only("alpha.safetensors", mask=_white())], steps=4)
    _close(white, whole, plain)
    _, none = _gen(webui, slots=[unet_only("alpha.safetensors", mask=_black()), unet_only("beta.safetensors", mask=_black())], steps=4)
    effect = (whole - plain).abs().max().item()
    # the webui's attention picks its chunking from free memory: two plain runs agree to rounding, not bits
    assert (none - plain).abs().max().item() < 1e-3 * effect
    answer, two = _gen(webui, slots=[unet_only("alpha.safetensors", mask=_mask(True)),
                                     unet_only("beta.safetensors", mask=_mask(False))], steps=4)
    params = json.loads(answer["info"])["extra_generation_params"]
    assert params["AddNet Mask 1"].startswith("64x64 #") and params["AddNet Mask 2"] != params["AddNet Mask 1"]
    _, only_beta = _gen(webui, slots=[unet_only("beta.safetensors")], steps=4)
    half = plain.shape[-1] // 2
    left = lambda t: t[..., :half].abs().mean().item()      # noqa: E731
    right = lambda t: t[..., half:].abs().mean().item()     # noqa: E731
    assert left(two - whole) < left(only_beta - whole) and right(two - only_beta) < right(whole - only_beta)
    answer, late = _gen(webui, slots=[unet_only("alpha.safetensors", start=0.5)], steps=4)
    assert json.loads(answer["info"])["extra_generation_params"]["AddNet Start 1"] == "0.5"
    _, early = _gen(webui, slots=[unet_only("alpha.safetensors", stop=0.5)], steps=4)
    for part in (late, early):          # each half of the steps moves the latents, neither as much as all of them
        assert min((part - plain).abs().max().item(), (part - whole).abs().max().item()) > 0.01 * effect
    _, full_range = _gen(webui, slots=[unet_only("alpha.safetensors", start=0, stop=1)], steps=4)
    assert (full_range - whole).abs().max().item() < 1e-3 * effect
    _gen(webui)
    assert webui.weights() == before


def _white() -> str:
    return _solid(255)


def _black() -> str:
    return _solid(0)


def _solid(value: int) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (16, 16), value).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_api_routes(webui):
    listed = {item["name"]: item for item in webui.get("/lora_ext/v1/loras")}
    assert {"alpha.safetensors", "beta.safetensors"} <= set(listed)
    assert re.fullmatch(r"[0-9a-f]{12}", listed["alpha.safetensors"]["hash"] or "")
    report = webui.get("/lora_ext/v1/loras/alpha.safetensors")
    assert report["file"] == "alpha.safetensors" and report["arch"] == "sd1"
    with webui.client() as c:
        assert c.get("/lora_ext/v1/loras/..%2F..%2Fconfig.json").status_code == 404
        assert c.get("/lora_ext/v1/loras/nothing.safetensors").status_code == 404


@pytest.mark.parametrize("model", ["../alpha.safetensors", "missing.safetensors", "/etc/passwd"])
def test_a_refused_lora_is_told_to_the_api_caller(webui, model):
    before = webui.weights()
    answer, _ = _gen(webui, slots=[_slot(model, 0.5)])
    said = json.loads(answer["info"])["extra_generation_params"].get("AddNet Warning", "")
    assert "slot 1" in said and model.split("/")[-1] in said, said
    assert webui.weights() == before


@pytest.mark.parametrize("slot,said", [
    ({"weight": "nan"}, "must be a finite number"), ({"weight": float("inf")}, "must be a finite number"),
    ({"weight": 1e9}, "must be a finite number"), ({"weight": "abc"}, "is not a number"),
    ({"unet": "nan", "te": 1}, "slot unet 'nan' must be a finite number"), ({"scale": 2}, "unknown slot fields: scale"),
])
def test_a_weight_that_is_not_a_weight_is_told_and_changes_nothing(webui, slot, said):
    before = webui.weights()
    answer, _ = _gen(webui, slots=[{"enabled": True, "model": "alpha.safetensors", **slot}])
    warning = json.loads(answer["info"])["extra_generation_params"].get("AddNet Warning", "")
    assert said in warning, warning
    assert webui.weights() == before


def test_a_pt_lora_reads_inside_the_webui(webui):
    # the webui's torch.load refuses what this torch writes and returns None; we must not depend on it
    _, st = _gen(webui, slots=[_slot("alpha.safetensors", 0.7)])
    answer, pt = _gen(webui, slots=[_slot("alpha_pt.pt", 0.7)])
    assert "AddNet Warning" not in json.loads(answer["info"])["extra_generation_params"]
    assert "AddNet Model 1: alpha_pt(" in _infotext(answer) or "AddNet Model 1: alpha_pt" in _infotext(answer)
    assert (st - pt).abs().max() < 1e-6
    _gen(webui)


@pytest.mark.parametrize("network", sorted(harness.TYPE_FILES))
def test_each_type_is_applied_as_the_builtin_applies_it(webui, network):
    """LoHa, LoKr, IA3, OFT, BOFT, (first layout, the one the built-in can apply) GLoRA, full/diff (weights and
    biases, conv_in / conv_out / time embedding too) and norm files: the panel gives the latents `<lora:name:w>`
    gives, and the model's weights back bit-exact after."""
    before = webui.weights()
    _, plain = _gen(webui)
    _, builtin = _gen(webui, f"{PROMPT} <lora:{network}:0.8>")
    _, _ = _gen(webui)
    answer, ours = _gen(webui, slots=[_slot(f"{network}.safetensors", 0.8)])
    assert "AddNet Warning" not in json.loads(answer["info"])["extra_generation_params"]
    _close(ours, builtin, plain)
    _gen(webui)
    assert webui.weights() == before


def test_a_dora_file_is_applied_as_the_builtin_applies_it(webui):
    """The built-in's weight decomposition is the reference users see: with dora_scale the panel gives the
    same latents as `<lora:dora:w>`, unlike the same LoRA without its magnitudes."""
    _, plain = _gen(webui)
    _, builtin = _gen(webui, f"{PROMPT} <lora:dora:0.8>")
    _, _ = _gen(webui)
    _, ours = _gen(webui, slots=[_slot("dora.safetensors", 0.8)])
    _close(ours, builtin, plain)
