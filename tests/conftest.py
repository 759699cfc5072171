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
    from lora_ext import tiny

    if arch not in _MODELS:
        _MODELS[arch] = tiny.build(arch)
    return _MODELS[arch]


@pytest.fixture(params=["sd1", "sd2", "sdxl"])
def any_arch(request):
    return request.param


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_app(folder):
    """The standalone tab on a free loopback port: (gradio Blocks, TabContext, port)."""
    from lora_ext.ui.app import make_app

    block, ctx = make_app(str(folder))
    port = free_port()
    from lora_ext.ui.app import QUEUE_WORKERS

    block.queue(concurrency_count=QUEUE_WORKERS).launch(server_name="127.0.0.1", server_port=port,
                                                       prevent_thread_lock=True, share=False)
    return block, ctx, port
