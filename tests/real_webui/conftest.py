"""Fixtures of the real-webui tier: one work copy of the webui per session, one server on it (and one with
--medvram for the tests that ask for it). Skipped, with one line saying how to enable it, where there is no
webui source, helper repositories or venv."""
import pytest

from conftest import free_port

from . import harness

def _setup():
    source = harness.webui_source()
    return source, harness.repositories(source), harness.webui_python(source)


TIER = harness.Tier("real_webui", _setup)


def pytest_collection_modifyitems(config, items):
    TIER.skip_if_unavailable(items)


def pytest_terminal_summary(terminalreporter):
    TIER.summary(terminalreporter)


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    source, repos, python = TIER.setup
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
