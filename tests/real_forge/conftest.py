"""Fixtures of the real-Forge tier: one work copy of Forge per session and one server on it. Skipped, with one
line saying what to provide, where there is no Forge source or venv."""
import pytest

from conftest import free_port
from real_webui.harness import Server, Tier

from . import harness

def _setup():
    source = harness.forge_source()
    return source, harness.forge_python(source)


TIER = Tier("real_forge", _setup)
_SERVERS: dict = {}         # the servers started, by model family


def pytest_collection_modifyitems(config, items):
    TIER.skip_if_unavailable(items)


def pytest_terminal_summary(terminalreporter):
    TIER.summary(terminalreporter)


@pytest.fixture(scope="session")
def forge_work(tmp_path_factory):
    source, python = TIER.setup
    return harness.make_work_copy(str(tmp_path_factory.mktemp("real_forge")), source, python)


@pytest.fixture(scope="session")
def forge(forge_work):
    server = _SERVERS["sd1"] = Server(forge_work, free_port(), log_name="forge.log", base_flags=harness.FLAGS).start()
    # Forge loads the model at the first generation and casts its fp16 text encoder at the first use: the
    # weights tests compare are those after one plain generation
    server.txt2img("warm up")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def forge_sdxl(forge_work):
    """A Forge of its own on the SDXL checkpoint (set before its first generation, so SD1.5 never loads),
    the SD1.5 one stopped first if a test started it: the two beside an SDXL training run do not fit a 24 GB
    machine (Forge on the CPU holds far more than the weights). The SDXL tests come last."""
    if "sd1" in _SERVERS:
        _SERVERS["sd1"].stop()
    server = _SERVERS["sdxl"] = Server(forge_work, free_port(), log_name="forge-sdxl.log",
                                       base_flags=harness.FLAGS).start()
    server.post("/sdapi/v1/options", {"sd_model_checkpoint": harness.SDXL_CHECKPOINT})
    server.txt2img("warm up")
    yield server
    server.stop()
