"""``scalebio export --format megatron``: per-source indexed datasets that megatron-core's
BlendedMegatronDatasetBuilder (GPTDataset) loads, blend weights that give each source pi of the
examples, the Megatron-LM line and the Megatron-Bridge/NeMo YAML, and the mixture.json manifest
that every export format writes."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from helpers import DEMO_DIR, write_jsonl
from scalebio.data import DataError
from scalebio.data.export import export_mixture, read_weights
from scalebio.data.prepare import load_data_config
from scalebio.tokenizer import load_tokenizer

SEQ = 16
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture
def data(tmp_path):
    """Two text sources, one with records about three times as long as the other's, and a validation set."""
    short = [{"text": " ".join(WORDS[(i + j) % 12] for j in range(3))} for i in range(60)]
    long = [{"text": " ".join(WORDS[(i + j) % 12] for j in range(11))} for i in range(40)]
    write_jsonl(tmp_path / "short.jsonl", short)
    write_jsonl(tmp_path / "long.jsonl", long)
    write_jsonl(tmp_path / "val.jsonl", [{"text": f"held out {w}"} for w in WORDS])
    (tmp_path / "data.yaml").write_text(
        f"tokenizer: {{type: sentencepiece, path: {DEMO_DIR / 'tokenizer.model'}}}\n"
        "sources:\n  short: {path: short.jsonl, format: text}\n  long: {path: long.jsonl, format: text}\n"
        "validation: {path: val.jsonl, format: text}\n")
    (tmp_path / "weights.json").write_text(json.dumps({"short": 0.5, "long": 0.5}))
    return tmp_path, {"short": short, "long": long}


class _Tokenizer:  # what GPTDataset reads of a tokenizer: the demo sentencepiece model's ids
    vocab_size, eod, pad = 2048, 3, 0
    unique_identifiers = {"class": "demo-sentencepiece"}


def _build(blend=None, blend_per_split=None, sizes=(4000, 0, 0)):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(random_seed=1234, sequence_length=SEQ, blend=blend, blend_per_split=blend_per_split,
                              split="100,0,0" if blend else None, tokenizer=_Tokenizer(), reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False, path_to_cache=None)  # in memory: no process group needed
    return BlendedMegatronDatasetBuilder(GPTDataset, list(sizes), lambda: True, config).build()


def _data_path(out):
    args = (out / "data-path.txt").read_text().split()
    assert args[0] == "--data-path" and args[-2:] == ["--split", "100,0,0"]
    pairs = args[1:-2]
    return [pairs[i + 1] for i in range(0, len(pairs), 2)], [float(pairs[i]) for i in range(0, len(pairs), 2)]


def test_blend_loads_in_megatron_and_gives_each_source_pi_of_the_examples(data, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    d, records = data
    cfg, weights = load_data_config(d / "data.yaml"), read_weights(d / "weights.json")
    out = tmp_path / "blend"
    lines = []
    export_mixture(weights, cfg, None, out, fmt="megatron", weights_path=d / "weights.json", say=lines.append)
    tok = load_tokenizer(cfg.tokenizer)
    lengths = {}
    for name, recs in records.items():  # every record once, in order, as the tokenizer encodes it
        ds = IndexedDataset(str(out / name))
        assert len(ds) == len(recs) and ds.document_indices.tolist() == list(range(len(recs) + 1))
        assert ds[0].dtype == np.uint16  # Megatron's dtype for a 2048-token vocabulary
        assert [tok.decode(ds[i]).strip() for i in range(len(recs))] == [r["text"] for r in recs]
        lengths[name] = float(ds.sequence_lengths.mean())
    prefixes, blend = _data_path(out)
    assert prefixes == [str(out.resolve() / "long"), str(out.resolve() / "short")]
    # pi is a share of examples; Megatron's weights are shares of tokens: pi_k * L_k, normalised
    ratio = lengths["long"] / lengths["short"]
    assert ratio > 2.5 and blend == pytest.approx([ratio / (1 + ratio), 1 / (1 + ratio)], rel=1e-8)
    train, valid, test = _build(blend=(prefixes, blend))
    assert valid is None and test is None and len(train) >= 4000  # megatron-core may round up by one
    sample = train[0]
    assert sample["tokens"].shape[0] == SEQ and int(sample["tokens"].max()) < 2048
    # the blend draws tokens by weight: examples come out half and half, as pi says
    drawn = np.bincount(train.dataset_index, minlength=2) * SEQ  # tokens from long, short
    examples = drawn / np.array([lengths["long"], lengths["short"]])
    assert examples[0] / examples.sum() == pytest.approx(0.5, abs=0.01)
    # the negative control: pi used as Megatron weights would give long's examples a third of the share
    assert 0.5 / lengths["long"] / (0.5 / lengths["long"] + 0.5 / lengths["short"]) < 0.3
    bridge = yaml.safe_load((out / "blend.yaml").read_text())
    assert bridge["dataset"] == {"blend": [prefixes, blend], "split": "100,0,0"}
    assert bridge["data_prefix"] == [blend[0], prefixes[0], blend[1], prefixes[1]]
    assert any("blend weights count tokens" in line for line in lines)


def test_manifest_is_the_same_for_every_format(data, tmp_path):
    d, records = data
    cfg, weights = load_data_config(d / "data.yaml"), read_weights(d / "weights.json")
    export_mixture(weights, cfg, None, tmp_path / "blend", fmt="megatron", weights_path=d / "weights.json",
                   say=lambda *a: None)
    export_mixture(weights, cfg, 30, tmp_path / "mix.jsonl", weights_path=d / "weights.json", say=lambda *a: None)
    mega = json.loads((tmp_path / "blend" / "mixture.json").read_text())
    jsonl = json.loads((tmp_path / "mix.mixture.json").read_text())
    assert set(mega) - {"megatron"} == set(jsonl)
    for m in (mega, jsonl):
        assert m["scalebio_version"] == "0.1.0" and m["seed"] == 1234
        assert m["weights"] == {"long": 0.5, "short": 0.5}
        assert m["available"] == {"long": 40, "short": 60}
        (f,) = m["sources"]["short"]["files"]
        assert f["sha256"] == hashlib.sha256((d / "short.jsonl").read_bytes()).hexdigest()
        assert m["tokenizer"]["file"] == hashlib.sha256((DEMO_DIR / "tokenizer.model").read_bytes()).hexdigest()
        assert m["weights_file"]["sha256"] == hashlib.sha256((d / "weights.json").read_bytes()).hexdigest()
    assert jsonl["format"] == "jsonl" and jsonl["size"] == 30 and jsonl["samples"] == {"long": 15, "short": 15}
    assert jsonl["outputs"] == ["mix.jsonl"]
    assert mega["format"] == "megatron" and mega["size"] is None and mega["samples"] == {"long": 40, "short": 60}
    assert sorted(mega["outputs"]) == sorted(p.name for p in (tmp_path / "blend").iterdir())
    assert set(mega["megatron"]["blend_weights"]) == {"long", "short"}
    # the same inputs give the same manifest
    export_mixture(weights, cfg, 30, tmp_path / "mix.jsonl", weights_path=d / "weights.json", overwrite=True,
                   say=lambda *a: None)
    assert json.loads((tmp_path / "mix.mixture.json").read_text()) == jsonl


def test_validation_split_and_zero_weights(data, tmp_path):
    d, records = data
    cfg = load_data_config(d / "data.yaml")
    out = tmp_path / "blend"
    export_mixture({"short": 1.0, "long": 0.0}, cfg, None, out, fmt="megatron", with_validation=True,
                   say=lambda *a: None)
    assert not (out / "long.bin").exists()  # pi = 0: not in the mixture
    args = (out / "data-path.txt").read_text().split()
    assert args == ["--train-data-path", "1.0", str(out.resolve() / "short"), "--valid-data-path", "1.0",
                    str(out.resolve() / "validation")]
    split = yaml.safe_load((out / "blend.yaml").read_text())["dataset"]["blend_per_split"]
    train, valid, test = _build(blend_per_split=split, sizes=(100, 20, 0))
    assert len(train) >= 100 and len(valid) >= 20 and test is None


def test_overwrite_replaces_only_an_earlier_export(data, tmp_path):
    d, _ = data
    cfg, weights = load_data_config(d / "data.yaml"), read_weights(d / "weights.json")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not an earlier megatron export"):
        export_mixture(weights, cfg, None, mine, fmt="megatron", overwrite=True, say=lambda *a: None)
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    out = tmp_path / "blend"
    export_mixture(weights, cfg, None, out, fmt="megatron", say=lambda *a: None)
    with pytest.raises(DataError, match="exists and is not empty"):
        export_mixture(weights, cfg, None, out, fmt="megatron", say=lambda *a: None)
    export_mixture({"short": 1.0, "long": 0.0}, cfg, None, out, fmt="megatron", overwrite=True, say=lambda *a: None)
    assert not (out / "long.bin").exists() and not list(tmp_path.glob(".blend.tmp-*"))


def test_the_cli_exports_a_blend_without_size(data, tmp_path):
    d, _ = data
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "scalebio", "export", "--format", "megatron", "--weights",
                           str(d / "weights.json"), "--data", str(d / "data.yaml"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote a Megatron blend of 2 sources" in proc.stdout and (out / "mixture.json").is_file()
    no_size = subprocess.run([sys.executable, "-m", "scalebio", "export", "--weights", str(d / "weights.json"),
                              "--data", str(d / "data.yaml"), "--out", str(tmp_path / "m.jsonl")],
                             capture_output=True, text=True, timeout=300)
    assert no_size.returncode == 2 and "--size is needed for the jsonl format" in no_size.stderr
