"""Fixtures: open a tiny real run (backend set up) and keep tests single-process."""
from __future__ import annotations

import pytest

from helpers import tiny_request
from scalebio.runner import open_run, prepare


@pytest.fixture
def tiny_run(tmp_path):
    """Open a tiny run (backend set up, models built); closes process groups afterwards."""
    opened = []

    def _open(*sets, plugins=(), data=None, steps=3):
        cm = open_run(prepare(tiny_request(tmp_path, *sets, plugins=plugins, data=data, steps=steps)),
                      verbose=False)
        opened.append(cm)
        return cm.__enter__()

    yield _open
    for cm in reversed(opened):
        cm.__exit__(None, None, None)


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch, tmp_path_factory):
    # a test process is never a torchrun rank
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    # tokenized data goes to a cache shared by this session's tests, never to the user's ~/.cache
    monkeypatch.setenv("SCALEBIO_CACHE", str(tmp_path_factory.getbasetemp() / "scalebio-cache"))


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The converted SmolLM2-135M-Instruct checkpoint (`scalebio models fetch smollm2-135m`), fetched
    once per session into the session's cache, so a CI run downloads it once. Tests that use it are
    marked ``real_model``. SCALEBIO_TEST_MODELS=DIR keeps the fetch in DIR across sessions (local work)."""
    import os

    from scalebio.fetch import fetch

    root = os.environ.get("SCALEBIO_TEST_MODELS") or tmp_path_factory.getbasetemp() / "scalebio-cache"
    return fetch("smollm2-135m", cache_dir=root, log=lambda *a: None)
