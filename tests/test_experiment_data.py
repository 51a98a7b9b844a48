"""tools/make_experiment_data.py: deterministic, disjoint, loadable, the corruptions are what they
claim (measured against a fresh read of the corpus), and `check` passes and fails as stated."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import DEMO_DIR, REPO
from scalebio.data import RunData
from scalebio.data.prepare import load_data_config
from scalebio.tokenizer import load_tokenizer

TOOL = REPO / "tools" / "make_experiment_data.py"
sys.path.insert(0, str(REPO / "tools"))
from experiment_data import checks, corpora, generators  # noqa: E402

FILES = {"denoising": ["clean", "shuffled", "wrong"],
         "instruction-quality": ["degraded", "good", "mismatched", "truncated"],
         "noise-ladder": ["noise00", "noise25", "noise50", "noise75"],
         "multilingual": ["de", "es", "fr"]}
SIZE, EVAL = 60, 20


def _tool(*args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], check=check, capture_output=True, text=True)


def _make(out: Path, experiment: str, *args) -> dict:
    corpus = [] if experiment == "multilingual" else ["--corpus", "pydoc"]
    _tool(experiment, *corpus, "--out", out, "--tokenizer", out.parent / "tok", "--train", SIZE, "--eval", EVAL, *args)
    return {f.name: f.read_bytes() for f in sorted(out.iterdir())}


def _records(data: dict, name: str) -> list:
    return [json.loads(line)["messages"] for line in data[name].decode().splitlines()]


def _sets(data: dict, experiment: str) -> dict:
    return {n: _records(data, f"{n}.jsonl") for n in FILES[experiment] + ["validation", "test"]}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each experiment's files at seed 0 (the pydoc corpus for the item experiments)."""
    root = tmp_path_factory.mktemp("experiments")
    return {e: _make(root / e, e) for e in FILES}


@pytest.fixture(scope="module")
def truth():
    """prompt -> the right response, from a fresh read of the corpus."""
    return {p: r for _, p, r in corpora.pydoc_items(random.Random("0:corpus:pydoc"))}


@pytest.mark.parametrize("experiment", sorted(FILES))
def test_each_experiment_is_deterministic_from_the_seed(tmp_path, built, experiment):
    a = built[experiment]
    b = _make(tmp_path / "b", experiment)
    c = _make(tmp_path / "c", experiment, "--seed", "1")
    assert sorted(a) == sorted([f"{n}.jsonl" for n in FILES[experiment]] +
                               ["data.yaml", "experiment.json", "test.jsonl", "validation.jsonl"])
    assert all(a[k] == b[k] for k in a if k != "data.yaml")  # data.yaml names its own --out
    assert a[f"{FILES[experiment][0]}.jsonl"] != c[f"{FILES[experiment][0]}.jsonl"]


@pytest.mark.parametrize("experiment", sorted(FILES))
def test_sets_have_their_sizes_and_share_no_item(built, experiment):
    sets = _sets(built[experiment], experiment)
    assert [len(v) for v in sets.values()] == [SIZE] * len(FILES[experiment]) + [EVAL, EVAL]
    # the key of an item: the prompt, or for translations the English message without the language
    keys = [m[0]["content"].split(":", 1)[-1] for recs in sets.values() for m in recs]
    assert len(keys) == len(set(keys)), "an item appears in two sets"
    assert all(len(m) == 2 and m[1]["content"] for recs in sets.values() for m in recs)


def test_denoising_sets_are_corrupted_as_described(built, truth):
    sets = _sets(built["denoising"], "denoising")
    for name in ("clean", "validation", "test"):
        assert all(m[1]["content"] == truth[m[0]["content"]] for m in sets[name]), name
    wrong = sets["wrong"]
    assert all(m[1]["content"] != truth[m[0]["content"]] for m in wrong)
    assert sorted(m[1]["content"] for m in wrong) == sorted(truth[m[0]["content"]] for m in wrong)
    for m in sets["shuffled"]:
        right = truth[m[0]["content"]]
        assert sorted(m[1]["content"].rstrip(".").split()) == sorted(right.rstrip(".").split())
    assert sum(m[1]["content"] != truth[m[0]["content"]] for m in sets["shuffled"]) >= 55


def test_instruction_quality_sources_are_what_they_claim(built, truth):
    sets = _sets(built["instruction-quality"], "instruction-quality")
    for name in ("good", "validation", "test"):
        assert all(m[1]["content"] == truth[m[0]["content"]] for m in sets[name]), name
    for m in sets["truncated"]:
        right = generators.words_of(truth[m[0]["content"]])
        assert m[1]["content"].split() == right[:max(1, len(right) // 2)]
    mismatched = sets["mismatched"]
    assert all(m[1]["content"] != truth[m[0]["content"]] for m in mismatched)
    assert sorted(m[1]["content"] for m in mismatched) == sorted(truth[m[0]["content"]] for m in mismatched)
    for m in sets["degraded"]:
        right, got = generators.words_of(truth[m[0]["content"]]), generators.words_of(m[1]["content"])
        assert len(got) == len(right) and sum(a != b for a, b in zip(got, right)) == round(len(right) / 2)


def test_noise_ladder_sources_have_the_corruption_they_claim(built, truth):
    data = built["noise-ladder"]
    claim = json.loads(data["experiment.json"])["check"]
    sets = _sets(data, "noise-ladder")
    for name, level in (("noise00", 0.0), ("noise25", 0.25), ("noise50", 0.5), ("noise75", 0.75)):
        changed = total = 0
        for m in sets[name]:
            right, got = generators.words_of(truth[m[0]["content"]]), generators.words_of(m[1]["content"])
            assert len(got) == len(right)
            changed += sum(a.lower() != b.lower() for a, b in zip(got, right))
            total += len(right)
        assert abs(changed / total - level) <= 0.5 / total, name  # exactly round(level * N) words
        assert claim["noise"][name] == pytest.approx(changed / total), name
    assert all(m[1]["content"] == truth[m[0]["content"]] for m in sets["validation"] + sets["test"])


def test_multilingual_sources_are_translations_in_their_language(built):
    sets = _sets(built["multilingual"], "multilingual")
    catalog = dict(corpora.catalog_items(["de", "fr", "es"]))
    names = {"de": "German", "fr": "French", "es": "Spanish"}
    for name, lang in (("de", "de"), ("fr", "fr"), ("es", "es"), ("validation", "de"), ("test", "de")):
        for m in sets[name]:
            head, message = m[0]["content"].split(": ", 1)
            assert head == f"Translate into {names[lang]}" and m[1]["content"] == catalog[json.loads(message)][lang]
    assert json.loads(built["multilingual"]["experiment.json"])["check"]["source"] == "de"


@pytest.mark.parametrize("experiment", ["multilingual", "noise-ladder"])
def test_the_data_loads_through_the_data_loader(tmp_path, experiment):
    out = tmp_path / "d"
    _make(out, experiment, "--seq-length", "200", "--tokenizer", DEMO_DIR / "tokenizer.model")
    cfg = load_data_config(str(out / "data.yaml"), [f"cache_dir={tmp_path / 'cache'}"])
    assert sorted(cfg.sources) == FILES[experiment] and all(s.format == "messages" for s in cfg.sources.values())
    assert cfg.seq_length == 200 and cfg.tokenizer.path == str((DEMO_DIR / "tokenizer.model").resolve())
    data = RunData(cfg, load_tokenizer(cfg.tokenizer), 0)
    assert data.source_sizes() == {n: SIZE for n in FILES[experiment]}
    assert len(data.val.samples) == len(data.test.samples) == EVAL
    assert data.warnings == []  # no validation or test example duplicates a training one


def test_missing_text_and_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(corpora.CorpusError, match="apt-get install wordnet-base"):
        corpora.wordnet_items(random.Random(0), root=tmp_path)
    with pytest.raises(corpora.CorpusError, match=r"no gettext catalogs for 'de'"):
        corpora.catalog_items(["de"], root=tmp_path)
    with pytest.raises(corpora.CorpusError, match="unknown language code"):
        corpora.catalog_items(["xx"])
    r = _tool("multilingual", "--out", tmp_path / "o", "--tokenizer", tmp_path, "--locale-root", tmp_path, check=False)
    assert r.returncode == 2 and "no gettext catalogs for 'de'" in r.stderr and not (tmp_path / "o").exists()
    r = _tool("noise-ladder", "--corpus", "pydoc", "--out", tmp_path / "o", "--tokenizer", tmp_path,
              "--levels", "0,50,25", check=False)
    assert r.returncode == 2 and "--levels '0,50,25'" in r.stderr
    r = _tool("multilingual", "--out", tmp_path / "o", "--tokenizer", tmp_path, "--languages", "de,fr", "--target", "es",
              check=False)
    assert r.returncode == 2 and "--target 'es' is not one of --languages de,fr" in r.stderr


def test_spearman_against_hand_computed_values():
    assert checks.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    assert checks.spearman([0.4, 0.3, 0.2, 0.1], [0, 0.5, 0.25, 0.75]) == pytest.approx(-0.8)  # one swap
    assert checks.ranks([3, 1, 3, 2]) == [3.5, 1, 3.5, 2]
    assert checks.spearman([1, 1, 1], [1, 2, 3]) == 0.0


def _run(tmp_path, name, weights):
    run = tmp_path / name
    run.mkdir()
    (run / "weights.json").write_text(json.dumps(weights))
    return run


@pytest.mark.parametrize("experiment,passing,failing,number", [
    ("denoising", {"clean": 0.92, "wrong": 0.05, "shuffled": 0.03}, {"clean": 0.85, "wrong": 0.1, "shuffled": 0.05},
     "wrong + shuffled = 0.0800"),
    ("instruction-quality", {"good": 0.4, "truncated": 0.3, "mismatched": 0.2, "degraded": 0.1},
     {"good": 0.3, "truncated": 0.4, "mismatched": 0.2, "degraded": 0.1}, "good leads by +0.1000"),
    ("noise-ladder", {"noise00": 0.4, "noise25": 0.3, "noise50": 0.2, "noise75": 0.1},
     {"noise00": 0.4, "noise25": 0.2, "noise50": 0.3, "noise75": 0.1}, "Spearman(pi, noise) = -1.000"),
    ("multilingual", {"de": 0.5, "fr": 0.3, "es": 0.2}, {"de": 0.3, "fr": 0.5, "es": 0.2}, "top de"),
])
def test_check_passes_and_fails_on_weights_files(tmp_path, built, experiment, passing, failing, number):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "experiment.json").write_bytes(built[experiment]["experiment.json"])
    good, bad = _run(tmp_path, "good", passing), _run(tmp_path, "bad", failing)
    r = _tool("check", data_dir, good, check=False)
    assert r.returncode == 0 and "PASS" in r.stdout and number in r.stdout, r.stdout + r.stderr
    r = _tool("check", data_dir, good, bad / "weights.json", check=False)
    assert r.returncode == 1 and r.stdout.count("PASS") == 1 and r.stdout.count("FAIL") == 1, r.stdout
    compare = tmp_path / "compare"
    (compare / "bilevel").mkdir(parents=True)
    (compare / "bilevel" / "weights.json").write_text(json.dumps(passing))  # a compare directory
    assert _tool("check", data_dir, compare, check=False).returncode == 0
    other = _run(tmp_path, "other", {"a": 0.5, "b": 0.5})
    r = _tool("check", data_dir, other, check=False)
    assert r.returncode == 2 and "a run on other data" in r.stderr
    r = _tool("check", tmp_path, good, check=False)
    assert r.returncode == 2 and "experiment.json is missing" in r.stderr
