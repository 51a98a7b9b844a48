"""The minimal data path: formats and their loss masks, bad lines, sampling."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import DEMO_DIR, demo_data_yaml, tiny_request, write_jsonl
from scalebio.config import DataConfig, SourceConfig, TokenizerConfig
from scalebio.data import DataError, EpochSampler, RunData, encode_record, read_records
from scalebio.runner import prepare
from scalebio.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TokenizerConfig(path=str(DEMO_DIR / "tokenizer.model")))


def test_prompt_response_supervises_only_the_response_and_eos(tok):
    p, r = tok.encode("Return the"), tok.encode("sum of the values.")
    sample, cut = encode_record({"prompt": "Return the", "response": "sum of the values."}, "prompt_response", tok, 64)
    assert not cut
    assert sample.ids.tolist() == [tok.bos_id] + p + r + [tok.eos_id]
    targets = sample.ids[1:]
    # target j is ids[j + 1]: the prompt's own tokens are never targets, the response and EOS are
    assert targets[sample.mask].tolist() == r + [tok.eos_id]
    assert sample.mask.tolist() == [False] * len(p) + [True] * (len(r) + 1)


def test_text_supervises_every_token_and_truncates(tok):
    ids = tok.encode("Examples of containers are tuples, lists and dictionaries.")
    sample, cut = encode_record({"text": "Examples of containers are tuples, lists and dictionaries."}, "text", tok, 5)
    assert cut and len(sample.ids) == 6 and sample.mask.all()
    assert sample.ids.tolist() == ([tok.bos_id] + ids)[:6]


def test_malformed_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n\n{"text": "broken"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        read_records(f, "text")
    f.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: key 'response' is missing"):
        read_records(f, "prompt_response")
    f.write_text('{"text": 3}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: key 'text' is not a string \(int\)"):
        read_records(f, "text")


def test_empty_and_missing_sources_are_clear(tmp_path, tok):
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "a b c"}])
    cfg = DataConfig(sources={"e": SourceConfig(str(empty))}, validation=SourceConfig(str(val)), seq_length=16)
    with pytest.raises(DataError, match="source 'e' .* has no samples"):
        RunData(cfg, tok, 0)
    cfg = DataConfig(sources={"m": SourceConfig(str(tmp_path / "nope.jsonl"))}, validation=SourceConfig(str(val)))
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
        RunData(cfg, tok, 0)


def test_source_ids_follow_sorted_names_not_yaml_order(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "alpha beta"}] * 3)
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "gamma delta"}] * 5)
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": "alpha"}])
    data_yaml = demo_data_yaml(tmp_path, zeta=(a, "text"), alpha=(b, "text"), validation=(val, "text"))
    p = prepare(tiny_request(tmp_path, data=data_yaml))
    data = RunData(p.config.data, tok, 0)
    assert data.source_names == ["alpha", "zeta"]
    assert [len(t.samples) for t in data.train] == [5, 3]


def test_sampler_is_deterministic_covers_epochs_and_restores():
    a, b = EpochSampler(10, seed=5, stream=1), EpochSampler(10, seed=5, stream=1)
    first = a.take(7)
    assert np.array_equal(first, b.take(7))
    rest = a.take(3)
    assert sorted(first.tolist() + rest.tolist()) == list(range(10))  # one epoch without replacement
    state = a.state_dict()
    c = EpochSampler(10, seed=5, stream=1)
    c.load_state_dict(state)
    assert np.array_equal(a.take(13), c.take(13))
    assert not np.array_equal(EpochSampler(10, seed=6, stream=1).take(10), EpochSampler(10, seed=5, stream=1).take(10))


def test_validation_batches_are_fresh_every_step(tmp_path, tok):
    p = prepare(tiny_request(tmp_path))
    data = RunData(p.config.data, tok, 0)
    v1, v2 = data.next_val(4), data.next_val(4)
    assert not np.array_equal(v1.tokens.numpy(), v2.tokens.numpy())
    assert (v1.source == -1).all()
    t = data.next_train(8)
    assert t.tokens.shape == (8, 32) and t.loss_mask.shape == (8, 32)
    # padding (the <pad> piece, never produced by encoding) carries no loss
    assert (t.tokens == tok.pad_id).any() and ((t.tokens == tok.pad_id) & (t.loss_mask > 0)).sum() == 0
