"""The real Forge (dfdcbab6, gradio 4.40): the extension loads, and the Additional Networks panel against
Forge's built-in `<lora:>` on the same seed (final latents, as the A1111 tier compares them), with the model's
weights as they were after every generation; all through its HTTP API."""
import pytest

from . import harness

PROMPT = "a photo of a cat"


def _gen(forge, prompt=PROMPT, slots=None, **params):
    answer = forge.txt2img(prompt, slots, **params)
    return answer, forge.latents()


def _slot(model, weight=None, **parts):
    return {"enabled": True, "model": model, **({"weight": weight} if weight is not None else parts)}


def _close(a, b, reference, gap_bound=1e-3):
    """a and b agree to well within how far `reference` is from them (the LoRA's own effect)."""
    effect = (a - reference).abs().max().item()
    gap = (a - b).abs().max().item()
    assert effect > 1e-2, f"the LoRA changes the latents by only {effect}"
    assert gap < gap_bound * max(1.0, effect), f"differ by {gap} (the LoRA's effect is {effect})"
    print(f"gap {gap:.2e}, the LoRA's effect {effect:.2e}")
    return gap, effect


def test_startup_is_clean(forge):
    log = forge.log()
    assert "Traceback" not in log, log[-4000:]
    assert "Error loading script" not in log
    assert "additional networks" in forge.get("/sdapi/v1/scripts")["txt2img"]


@pytest.mark.parametrize("name", [harness.LORA, harness.PLAIN] + [f"{t}.safetensors" for t in harness.TYPES])
def test_panel_equals_the_builtin_lora_and_gives_the_weights_back(forge, name):
    panel_equals_builtin(forge, name)


def panel_equals_builtin(forge, name):
    """The panel at 0.7 against `<lora:name:0.7>`; Forge's weights as before after each, and the plain
    generation after them as before."""
    before = forge.weights()
    _, plain = _gen(forge)
    _, builtin = _gen(forge, f"{PROMPT} <lora:{name.rsplit('.', 1)[0]}:0.7>")
    _, ours = _gen(forge, slots=[_slot(name, 0.7)])
    assert forge.weights() == before
    _close(ours, builtin, plain)
    _, again = _gen(forge)
    assert (again - plain).abs().max() == 0
    assert forge.weights() == before


PART_CASES = [({"unet": 0.0, "te": 0.6}, "0.6:0"), ({"unet": 0.6, "te": 0.0}, "0:0.6")]


@pytest.mark.parametrize("parts,builtin", PART_CASES)
def test_text_encoder_only_and_unet_only(forge, parts, builtin):
    part_equals_builtin(forge, harness.LORA, parts, builtin)


def part_equals_builtin(forge, name, parts, builtin):
    """A slot's text-encoder and UNet weights against `<lora:name:te:unet>`."""
    _, plain = _gen(forge)
    _, theirs = _gen(forge, f"{PROMPT} <lora:{name.rsplit('.', 1)[0]}:{builtin}>")
    _, ours = _gen(forge, slots=[_slot(name, **parts)])
    _close(ours, theirs, plain)


def test_stacks_with_the_builtin_and_both_go_back(forge):
    before = forge.weights()
    _, plain = _gen(forge)
    _, both_builtin = _gen(forge, f"{PROMPT} <lora:alpha:0.5> <lora:plain:0.8>")
    _, stacked = _gen(forge, f"{PROMPT} <lora:alpha:0.5>", slots=[_slot(harness.PLAIN, 0.8)])
    _close(stacked, both_builtin, plain)
    _, again = _gen(forge)
    assert (again - plain).abs().max() == 0 and forge.weights() == before


def _mask(value: int, size=64) -> str:
    """A PNG, base64, of one grey level."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (size, size), value).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_a_block_weight_preset(forge):
    _, plain = _gen(forge)
    unet_only = {"separate": True, "unet": 1.0, "te": 0.0}
    _, none = _gen(forge, slots=[{**_slot(harness.LORA), **unet_only, "block_weights": "NONE"}])
    assert (none - plain).abs().max() == 0          # every UNet block at 0: nothing of the LoRA acts
    _, whole = _gen(forge, slots=[{**_slot(harness.LORA), **unet_only}])
    answer, outall = _gen(forge, slots=[{**_slot(harness.LORA), **unet_only, "block_weights": "OUTALL"}])
    assert "AddNet Block Weights 1: OUTALL" in answer["info"]
    assert (outall - plain).abs().max() > 1e-2 and (outall - whole).abs().max() > 1e-2


def test_a_black_mask_equals_no_lora_and_a_white_one_the_whole_lora(forge):
    """Masks act through forward hooks on Forge's own layers (its Linear is not an nn.Linear)."""
    before = forge.weights()
    _, plain = _gen(forge)
    unet_only = {"separate": True, "unet": 1.0, "te": 0.0}
    _, whole = _gen(forge, slots=[{**_slot(harness.LORA), **unet_only}])
    _, white = _gen(forge, slots=[{**_slot(harness.LORA), **unet_only, "mask": _mask(255)}])
    _close(white, whole, plain)
    _, black = _gen(forge, slots=[{**_slot(harness.LORA), **unet_only, "mask": _mask(0)}])
    assert (black - plain).abs().max() < 1e-5
    _gen(forge)
    assert forge.weights() == before


def test_a_file_that_does_not_fit_is_a_warning_not_an_error(forge, tmp_path):
    answer, got = _gen(forge, slots=[_slot("nope.safetensors", 1.0)])
    info = answer["info"]
    assert "AddNet Warning" in info
    _, plain = _gen(forge)
    assert (got - plain).abs().max() == 0


def test_a_step_range_switches_the_lora_while_forge_samples(forge):
    """start / stop: the UNet part acts on half of the steps (Forge merges the new set when it switches)."""
    before = forge.weights()
    unet_only = {**_slot(harness.LORA), "separate": True, "unet": 1.0, "te": 0.0}
    _, plain = _gen(forge, steps=4)
    _, whole = _gen(forge, slots=[unet_only], steps=4)
    effect = (whole - plain).abs().max().item()
    answer, late = _gen(forge, slots=[{**unet_only, "start": 0.5}], steps=4)
    assert "AddNet Start 1: 0.5" in answer["info"]
    _, early = _gen(forge, slots=[{**unet_only, "stop": 0.5}], steps=4)
    for part in (late, early):          # each half of the steps moves the latents, neither as much as all of them
        assert min((part - plain).abs().max().item(), (part - whole).abs().max().item()) > 0.01 * effect
    _, full_range = _gen(forge, slots=[{**unet_only, "start": 0, "stop": 1}], steps=4)
    assert (full_range - whole).abs().max().item() == 0
    _, again = _gen(forge, steps=4)
    assert (again - plain).abs().max() == 0 and forge.weights() == before
