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
    server = Server(forge_work, free_port(), log_name="forge.log", base_flags=harness.FLAGS).start()
    # Forge loads the model at the first generation and casts its fp16 text encoder at the first use: the
    # weights tests compare are those after one plain generation
    server.txt2img("warm up")
    yield server
    server.stop()
