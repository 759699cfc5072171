"""SDXL in the real Forge: the panel against Forge's built-in `<lora:>` on the same seed (a LoCon on both
text encoders and the UNet, its parts apart, and a LoHa), the weights as they were after each generation, and
training from the LoRA tab on Forge's loaded SDXL. The checkpoint (tiny.SPECS['sdxl-forge']) has the real
CLIP-L, OpenCLIP-bigG and VAE and a UNet Forge still takes for SDXL (three levels all 320 wide)."""
import pytest

from test_browser import CHROMIUM, browser_page

from . import harness
from .test_forge_browser import train_then_compare
from .test_forge_panel import PART_CASES, panel_equals_builtin, part_equals_builtin


@pytest.fixture(scope="module")
def sdxl(forge_sdxl):
    return forge_sdxl


def test_forge_loaded_sdxl(sdxl):
    assert sdxl.get("/sdapi/v1/options")["sd_model_checkpoint"].startswith(harness.SDXL_CHECKPOINT[:-12])
    assert "Traceback" not in sdxl.log()


@pytest.mark.parametrize("name", [harness.SDXL_LORA, harness.SDXL_LOHA])
def test_panel_equals_the_builtin_on_sdxl_and_gives_the_weights_back(sdxl, name):
    panel_equals_builtin(sdxl, name)


@pytest.mark.parametrize("parts,builtin", PART_CASES)
def test_text_encoders_only_and_unet_only_on_sdxl(sdxl, parts, builtin):
    part_equals_builtin(sdxl, harness.SDXL_LORA, parts, builtin)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium and playwright: bash .ci/setup")
def test_train_in_the_tab_on_forges_sdxl_then_the_new_lora_in_the_panel_equals_the_builtin(sdxl, forge_work,
                                                                                            tmp_path):
    """As on SD1.5 (test_forge_browser): 4 steps from the tab on Forge's SDXL after a built-in `<lora:>`
    generation, its weights as they were after it, and the new LoRA in the panel equals `<lora:>` with it."""
    with browser_page(sdxl) as page:
        train_then_compare(sdxl, forge_work, page, tmp_path, harness.SDXL_LORA, "forgexl")
