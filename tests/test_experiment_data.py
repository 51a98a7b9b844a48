"""tools/make_experiment_data.py: deterministic, disjoint, and the corruptions are what they claim."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from scalebio.data.prepare import load_data_config

TOOL = REPO / "tools" / "make_experiment_data.py"


def _make(out: Path, *args) -> dict:
    subprocess.run([sys.executable, str(TOOL), "denoising", "--corpus", "pydoc", "--out", str(out), "--tokenizer",
                    str(out.parent / "tok"), "--train", "60", "--eval", "20", *args], check=True, capture_output=True)
    return {f.name: f.read_bytes() for f in sorted(out.iterdir())}


def _records(data: dict, name: str) -> list:
    return [json.loads(line)["messages"] for line in data[name].decode().splitlines()]


def test_denoising_is_deterministic_from_the_seed(tmp_path):
    a = _make(tmp_path / "a")
    b = _make(tmp_path / "b")
    c = _make(tmp_path / "c", "--seed", "1")
    assert sorted(a) == ["clean.jsonl", "data.yaml", "shuffled.jsonl", "test.jsonl", "validation.jsonl",
                         "wrong.jsonl"]
    assert all(a[k] == b[k] for k in a if k != "data.yaml")  # data.yaml names its own --out
    assert a["clean.jsonl"] != c["clean.jsonl"]


def test_denoising_sets_are_disjoint_and_corrupted_as_described(tmp_path):
    data = _make(tmp_path / "d")
    sets = {n: _records(data, f"{n}.jsonl") for n in ("clean", "wrong", "shuffled", "validation", "test")}
    assert [len(sets[n]) for n in sets] == [60, 60, 60, 20, 20]
    prompts = [m[0]["content"] for recs in sets.values() for m in recs]
    assert len(prompts) == len(set(prompts)), "an item appears in two sets"
    # the true answers of every prompt, from a fresh corpus read
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import random

        import make_experiment_data as med
        truth = {p: r for _, p, r in med.pydoc_items(random.Random("0:corpus:pydoc"))}
    finally:
        sys.path.pop(0)
    for name in ("clean", "validation", "test"):
        assert all(m[1]["content"] == truth[m[0]["content"]] for m in sets[name]), name
    wrong = sets["wrong"]
    assert all(m[1]["content"] != truth[m[0]["content"]] for m in wrong)
    assert sorted(m[1]["content"] for m in wrong) == sorted(truth[m[0]["content"]] for m in wrong)
    for m in sets["shuffled"]:
        right = truth[m[0]["content"]]
        assert sorted(m[1]["content"].rstrip(".").split()) == sorted(right.rstrip(".").split())
    assert sum(m[1]["content"] != truth[m[0]["content"]] for m in sets["shuffled"]) >= 55


def test_the_data_yaml_loads_with_the_models_tokenizer(tmp_path):
    _make(tmp_path / "e", "--seq-length", "48")
    cfg = load_data_config(str(tmp_path / "e" / "data.yaml"), [])
    assert sorted(cfg.sources) == ["clean", "shuffled", "wrong"]
    assert all(s.format == "messages" for s in cfg.sources.values())
    assert cfg.seq_length == 48 and cfg.tokenizer.path == str((tmp_path / "tok").resolve())
    assert cfg.test is not None and cfg.validation is not None


def test_missing_corpus_is_a_clear_error(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import random

        import make_experiment_data as med
        with pytest.raises(med.CorpusError, match="apt-get install wordnet-base"):
            med.wordnet_items(random.Random(0), root=tmp_path)
    finally:
        sys.path.pop(0)
