"""Fixtures: open a tiny real run (backend set up), keep tests single-process, the demo and ChatML
tokenizers of the data tests."""
from __future__ import annotations

import pytest

from data_helpers import CHATML, make_hf_tokenizer
from helpers import DEMO_DIR, tiny_request
from scalebio.config import TokenizerConfig
from scalebio.runner import open_run, prepare
from scalebio.tokenizer import load_tokenizer


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


@pytest.fixture(scope="session")
def tok():
    return load_tokenizer(TokenizerConfig(path=str(DEMO_DIR / "tokenizer.model")))


@pytest.fixture(scope="session")
def chatml_tok(tmp_path_factory):
    return make_hf_tokenizer(tmp_path_factory.mktemp("chatml"), {
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML})
