import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "host"))   # our double of the webui's `modules`
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")     # no network here: no analytics calls

_MODELS = {}


def tiny_model(arch: str):
    """One tiny model per architecture per session; tests that change weights must restore them."""
    from lora_ext.testing import tiny

    if arch not in _MODELS:
        _MODELS[arch] = tiny.build(arch)
    return _MODELS[arch]


@pytest.fixture(params=["sd1", "sd2", "sdxl"])
def any_arch(request):
    return request.param
