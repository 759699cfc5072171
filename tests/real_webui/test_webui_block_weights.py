"""Block weights against lora-block-weight itself, installed beside us in the real webui: a slot's
`block_weights` gives the final latents `<lora:name:w:lbw=...>` gives, for a LoRA and a LoCon, its presets and
vectors of every length (SD1: 17 and 26; SDXL: 12 and 20, and the SDXL presets users share). The largest
difference seen is written to the work folder's block_weight_gaps.json."""
import json
import os
import random

import pytest

from conftest import free_port

from . import harness
from .test_webui_panel import PROMPT, _slot

WEIGHT = 0.8
# the gap allowed: float32 sums in another order (seen: 0 to 1.0e-4 on SD1 and SDXL), three orders below the
# effect of a block at another factor (0.1 to 0.7 here)
GAP = 3e-4


def _vector(length: int, seed: int) -> str:
    rng = random.Random(seed)
    return ",".join(f"{rng.uniform(-0.5, 1.5):.3f}" for _ in range(length))


_PLAIN = {}


def _compare(server, work, name: str, block_weights: str, lbw_text: str, record: str) -> None:
    stem = os.path.splitext(name)[0]
    if server.url not in _PLAIN:
        server.txt2img(PROMPT)
        _PLAIN[server.url] = (server.latents(), server.weights())
    plain, weights = _PLAIN[server.url]
    server.txt2img(f"{PROMPT} <lora:{stem}:{WEIGHT}:lbw={lbw_text}>", lbw=True)
    theirs = server.latents()
    server.txt2img(PROMPT)       # the built-in gives its weights back on its next use
    answer = server.txt2img(PROMPT, slots=[{**_slot(name, WEIGHT), "block_weights": block_weights}])
    ours = server.latents()
    info = json.loads(answer["info"])["infotexts"][0]
    assert f"AddNet Block Weights 1: {block_weights}" in info or f'AddNet Block Weights 1: "{block_weights}"' in info
    gap = (ours - theirs).abs().max().item()
    effect = (theirs - plain).abs().max().item()
    path = os.path.join(os.path.dirname(work["webui"]), "block_weight_gaps.json")
    gaps = json.load(open(path)) if os.path.exists(path) else {}
    gaps[record] = {"gap": gap, "effect": effect}
    with open(path, "w") as f:
        json.dump(gaps, f, indent=1)
    print(f"{record}: max |ours - lora-block-weight| = {gap:.3g} (its effect on the latents {effect:.3g})")
    assert gap < GAP, f"{record}: differs from lora-block-weight by {gap} (the LoRA's effect {effect})"
    # the server as it was for the tests after: another prompt makes the webui run its text encoder again (it
    # reuses the last conditioning for the same prompt), where the built-in gives its text-encoder weights back
    server.txt2img("a photo of a dog")
    server.txt2img(PROMPT)
    assert server.weights() == weights


@pytest.fixture(scope="module")
def lbw(work):
    if not work["lbw"]:
        pytest.skip("lora-block-weight is not beside the webui source (../shared/a1111/lora-block-weight or "
                    "$LORA_EXT_LBW): the block-weight comparison needs it")
    return work


def _lbw_server(work, extra, log_name):
    """A webui of the tier's work copy with lora-block-weight enabled (the tier's other servers run without
    it, as most users do)."""
    settings = os.path.join(work["webui"], harness.LBW_SETTINGS)
    return harness.Server(work, free_port(), ["--ui-settings-file", settings, *extra], log_name=log_name).start()


@pytest.fixture(scope="module")
def sd1_lbw(lbw):
    server = _lbw_server(lbw, [], "webui-lbw.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sdxl_lbw(lbw):
    server = _lbw_server(lbw, ["--ckpt", lbw["sdxl_checkpoint"]], "webui-lbw-sdxl.log")
    yield server
    server.stop()


SD_CASES = [("NONE", "NONE"), ("OUTALL", "OUTALL"), ("MIDD", "MIDD"), (_vector(17, 1), None), (_vector(26, 2), None)]


@pytest.mark.parametrize("name", ["plain.safetensors", "alpha.safetensors"])
@pytest.mark.parametrize("ours,theirs", SD_CASES, ids=["NONE", "OUTALL", "MIDD", "17", "26"])
def test_sd1_block_weights_equal_lora_block_weight(sd1_lbw, lbw, name, ours, theirs):
    _compare(sd1_lbw, lbw, name, ours, theirs or ours, f"sd1 {name} {ours[:20]}")


XL_CASES = [("SDXL-OUTALL", "1,0,0,0,0,0,1,1,1,1,1,1"), ("SDXL-INALL", "1,1,1,1,1,0,0,0,0,0,0,0"),
            (_vector(12, 3), None), (_vector(20, 4), None)]


@pytest.mark.parametrize("ours,theirs", XL_CASES, ids=["SDXL-OUTALL", "SDXL-INALL", "12", "20"])
def test_sdxl_block_weights_equal_lora_block_weight(sdxl_lbw, lbw, ours, theirs):
    _compare(sdxl_lbw, lbw, "xl_alpha.safetensors", ours, theirs or ours, f"sdxl xl_alpha {ours[:20]}")
