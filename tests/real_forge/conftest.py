"""Fixtures of the real-Forge tier: one work copy of Forge per session and one server on it. Skipped, with one
line saying what to provide, where there is no Forge source or venv."""
import pytest

from conftest import free_port
from real_webui.harness import Server, Unavailable

from . import harness

_STATE = {}


def _availability():
    if "why" not in _STATE:
        try:
            source = harness.forge_source()
            _STATE["setup"] = (source, harness.forge_python(source))
            _STATE["why"] = None
        except Unavailable as e:
            _STATE["why"] = str(e)
    return _STATE["why"]


def pytest_collection_modifyitems(config, items):
    ours = [i for i in items if "real_forge" in str(i.fspath)]
    if ours and _availability():
        marker = pytest.mark.skip(reason=_STATE["why"])
        for item in ours:
            item.add_marker(marker)


def pytest_terminal_summary(terminalreporter):
    if _STATE.get("why"):
        terminalreporter.write_line(_STATE["why"])


@pytest.fixture(scope="session")
def forge_work(tmp_path_factory):
    source, python = _STATE["setup"]
    return harness.make_work_copy(str(tmp_path_factory.mktemp("real_forge")), source, python)


@pytest.fixture(scope="session")
def forge(forge_work):
    server = Server(forge_work, free_port(), log_name="forge.log", base_flags=harness.FLAGS).start()
    # Forge loads the model at the first generation and casts its fp16 text encoder at the first use: the
    # weights tests compare are those after one plain generation
    server.txt2img("warm up")
    yield server
    server.stop()
