"""Fixtures of the real-webui tier: one work copy of the webui per session, one server on it (and one with
--medvram for the tests that ask for it). Skipped, with one line saying how to enable it, where there is no
webui source, helper repositories or venv."""
import pytest

from conftest import free_port

from . import harness

_STATE = {}


def _availability():
    if "why" not in _STATE:
        try:
            source = harness.webui_source()
            _STATE["setup"] = (source, harness.repositories(source), harness.webui_python(source))
            _STATE["why"] = None
        except harness.Unavailable as e:
            _STATE["why"] = str(e)
    return _STATE["why"]


def pytest_collection_modifyitems(config, items):
    ours = [i for i in items if "real_webui" in str(i.fspath)]
    if ours and _availability():
        marker = pytest.mark.skip(reason=_STATE["why"])
        for item in ours:
            item.add_marker(marker)


def pytest_terminal_summary(terminalreporter):
    if _STATE.get("why"):
        terminalreporter.write_line(_STATE["why"])


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    source, repos, python = _STATE["setup"]
    folder = str(tmp_path_factory.mktemp("real_webui"))
    paths = harness.make_work_copy(folder, source, repos, python)
    installed = harness.run_installer(paths)
    paths["installer"] = installed
    return paths


@pytest.fixture(scope="session")
def webui(work):
    server = harness.Server(work, free_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def medvram(work, webui):
    server = harness.Server(work, free_port(), ["--medvram"], log_name="webui-medvram.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sdxl(work):
    """A webui that started on the tiny SDXL checkpoint (sgm's DiffusionEngine)."""
    server = harness.Server(work, free_port(), ["--ckpt", work["sdxl_checkpoint"]], log_name="webui-sdxl.log").start()
    yield server
    server.stop()
