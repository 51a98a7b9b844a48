"""Sampling: determinism, stratified counts, exact resume, test-set batches."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_helpers import data_cfg
from helpers import DEMO_DIR, demo_data_yaml, tiny_request, write_jsonl
from scalebio.config import ConfigError, DataConfig, SourceConfig, parse
from scalebio.data import DataError, EpochSampler, RunData
from scalebio.runner import prepare


def test_test_set_batches_cover_it_once_in_order(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"example {i}"} for i in range(10)])
    test = write_jsonl(tmp_path / "t.jsonl", [{"text": f"test {i}"} for i in range(5)])
    data = RunData(data_cfg(tmp_path, {"a": SourceConfig(str(a))}, test=SourceConfig(str(test))), tok, 0)
    batches = list(data.ordered_batches(data.test, 4))
    assert len(batches) == 2 and all(len(b) == 4 and (b.source == -1).all() for b in batches)
    assert batches[1].loss_mask[1:].sum() == 0  # padding rows carry no loss
    assert sum(b.supervised_tokens() for b in batches) == data.test.supervised_tokens


# --------------------------------------------------------------------------- sampling


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


def _demo_cfg(tmp_path, max_samples=None, **kw):
    return DataConfig(sources={n: SourceConfig(str(DEMO_DIR / f"{n}.jsonl"), format="prompt_response",
                                               max_samples=max_samples) for n in ("clean", "shuffled", "typos")},
                      validation=SourceConfig(str(DEMO_DIR / "validation.jsonl"), format="prompt_response"),
                      seq_length=32, cache_dir=str(tmp_path / "cache"), **kw)


def _same(x, y) -> bool:
    return all(torch.equal(getattr(x, f), getattr(y, f)) for f in ("tokens", "labels", "loss_mask", "source"))


@pytest.mark.parametrize("mode", [{}, {"sampling": "stratified"},
                                  {"sampling": "stratified", "batch_counts": {"clean": 5, "shuffled": 2, "typos": 2}}])
def test_a_resumed_run_sees_exactly_the_batches_it_would_have_seen(tmp_path, tok, mode):
    cfg = _demo_cfg(tmp_path, max_samples=40, **mode)
    n = 120  # several epochs of every stream: 40 samples per source, 9 per step
    full = RunData(cfg, tok, seed=11, global_batch=9)
    want = [(full.next_train(9), full.next_val(4)) for _ in range(n)]
    first = RunData(cfg, tok, seed=11, global_batch=9)
    for _ in range(n // 2):
        first.next_train(9), first.next_val(4)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = RunData(cfg, tok, seed=11, global_batch=9)
    resumed.load_state_dict(state)
    for train, val in want[n // 2:]:
        assert _same(resumed.next_train(9), train) and _same(resumed.next_val(4), val)
    other = RunData(cfg, tok, seed=12, global_batch=9)
    assert not _same(other.next_train(9), want[0][0])


def test_stratified_batches_hold_fixed_counts_per_source(tmp_path, tok):
    data = RunData(_demo_cfg(tmp_path, sampling="stratified", batch_counts={"clean": 2, "shuffled": 1, "typos": 5}),
                   tok, seed=0, global_batch=8)
    seen = set()
    for _ in range(200):  # 200 x 1 of shuffled's 700 samples: without replacement within its epoch
        b = data.next_train(8)
        assert b.source_counts(3).tolist() == [2.0, 1.0, 5.0]
        seen.add(b.tokens[b.source == 1][0].numpy().tobytes())
    assert len(seen) >= 199  # (two samples of the source may tokenize alike)
    even = RunData(_demo_cfg(tmp_path, sampling="stratified"), tok, seed=0)
    assert even.next_train(9).source_counts(3).tolist() == [3.0, 3.0, 3.0]
    with pytest.raises(DataError, match="splits run.global_batch=8 evenly over 3 sources"):
        RunData(_demo_cfg(tmp_path, sampling="stratified"), tok, seed=0, global_batch=8)
    with pytest.raises(DataError, match="batch_counts add up to 8 samples, but run.global_batch is 16"):
        RunData(_demo_cfg(tmp_path, sampling="stratified", batch_counts={"clean": 2, "shuffled": 1, "typos": 5}),
                tok, seed=0, global_batch=16)
    with pytest.raises(ConfigError, match="batch_counts must give a count for every source; missing: typos"):
        parse(DataConfig, {"sources": {"clean": {"path": "x"}, "typos": {"path": "y"}}, "sampling": "stratified",
                           "batch_counts": {"clean": 1}})


def test_restoring_a_state_from_other_data_is_refused(tmp_path, tok):
    data = RunData(_demo_cfg(tmp_path), tok, seed=0)
    state = data.state_dict()
    state["sizes"] = [10, 20, 30]
    with pytest.raises(DataError, match="the data changed since the state was saved"):
        RunData(_demo_cfg(tmp_path), tok, seed=0).load_state_dict(state)


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


