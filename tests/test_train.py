"""``scalebio train``: weighted sampling in the data layer, the ``train`` solver with ``fixed``
weights on the real backend, its files, bad weights, data without validation or test set, layouts,
and a final model that converts to transformers."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import DEMO_DIR, TINY, tiny_request
from scalebio.compare.train import natural_sizes, train, train_request
from scalebio.data import DataError, EpochSampler, RunData
from scalebio.data.batching import WeightedSampler
from scalebio.data.prepare import load_data_config
from scalebio.runner import open_run
from scalebio.tokenizer import load_tokenizer

PI = {"clean": 0.2, "shuffled": 0.5, "typos": 0.3}  # far from the natural 0.59 / 0.21 / 0.21


def _demo_data(sampling: str, pi=None, seed: int = 7, **over) -> RunData:
    sets = [f"sampling={sampling}", "seq_length=32"] + [f"{k}={v}" for k, v in over.items()]
    cfg = load_data_config(DEMO_DIR / "data.yaml", sets)
    probs = None if pi is None else (lambda: torch.tensor([pi[n] for n in sorted(pi)], dtype=torch.float64))
    return RunData(cfg, load_tokenizer(cfg.tokenizer), seed, sampling_probs=probs)


def _shares(data: RunData, batches: int, n: int = 32) -> np.ndarray:
    counts = sum(data.next_train(n).source_counts(3) for _ in range(batches))
    return (counts / counts.sum()).numpy()


# --------------------------------------------------------------------------- the data layer


def test_weighted_rows_follow_pi_and_uniform_rows_do_not():
    target = np.array([PI[n] for n in sorted(PI)])
    shares = _shares(_demo_data("weighted", PI), 100)  # 3200 rows: binomial sd of a share <= 0.009
    assert np.abs(shares - target).max() < 0.03, shares
    # negative control: pooled uniform sampling follows the source sizes, not pi
    assert np.abs(_shares(_demo_data("uniform"), 100) - target).max() > 0.2


def test_weighted_draws_exhaust_a_source_before_repeating_and_skip_zero_weights():
    sizes = [5, 7, 3]
    offsets = np.cumsum([0] + sizes)
    sampler = WeightedSampler([EpochSampler(n, 3, 100 + k) for k, n in enumerate(sizes)], offsets, 3, 4)
    sampler.set_probs([0.5, 0.0, 0.5])
    flat = sampler.take(200)
    src = np.searchsorted(offsets, flat, side="right") - 1
    assert set(src.tolist()) == {0, 2}  # the zero-weight source is never drawn
    for k in (0, 2):
        local = (flat[src == k] - offsets[k]).tolist()
        epochs = [local[i: i + sizes[k]] for i in range(0, len(local) - sizes[k] + 1, sizes[k])]
        assert len(epochs) > 5 and all(sorted(e) == list(range(sizes[k])) for e in epochs)
    # peek is the next take
    nxt = sampler.peek()
    assert sampler.take(1)[0] == nxt
    with pytest.raises(DataError, match="non-negative"):
        sampler.set_probs([0.5, -0.1, 0.6])


def test_weighted_batches_are_seeded_and_resume_exactly():
    a, b, other = _demo_data("weighted", PI), _demo_data("weighted", PI), _demo_data("weighted", PI, seed=8)
    for _ in range(3):
        assert torch.equal(a.next_train(16).tokens, b.next_train(16).tokens)
    assert not torch.equal(a.next_train(16).tokens, other.next_train(16).tokens)
    state = a.state_dict()
    expected = [a.next_train(16) for _ in range(2)]
    resumed = _demo_data("weighted", PI)
    resumed.load_state_dict(state)
    assert all(torch.equal(e.tokens, resumed.next_train(16).tokens) for e in expected)


def test_weighted_sampling_with_packing_counts_samples_by_pi():
    data = _demo_data("weighted", PI, packing="true")
    batch = data.next_train(8)
    assert batch.packed and len(batch) == 8
    counts = sum(data.next_train(8).source_counts(3) for _ in range(60))
    assert np.abs((counts / counts.sum()).numpy() - np.array([PI[n] for n in sorted(PI)])).max() < 0.03


# --------------------------------------------------------------------------- train runs


def _data_with_test(tmp_path: Path, validation: bool = True, test: bool = True) -> Path:
    val = (DEMO_DIR / "validation.jsonl").read_text().splitlines(True)
    (tmp_path / "val.jsonl").write_text("".join(val[:360]))
    (tmp_path / "test.jsonl").write_text("".join(val[360:]))
    text = (DEMO_DIR / "data.yaml").read_text().replace("path: ", f"path: {DEMO_DIR}/")
    text = "\n".join(ln for ln in text.splitlines() if not ln.startswith("validation:")) + "\n"
    if validation:
        text += f"validation: {{path: {tmp_path / 'val.jsonl'}, format: prompt_response}}\n"
    if test:
        text += f"test: {{path: {tmp_path / 'test.jsonl'}, format: prompt_response}}\n"
    path = tmp_path / "data.yaml"
    path.write_text(text)
    return path


def _records(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_run_builds_only_w_draws_by_the_weights_and_writes_its_files(tmp_path):
    data = _data_with_test(tmp_path)
    req = tiny_request(tmp_path, "train.eval_samples=16", "train.val_every=1", data=data, steps=3)
    prepared, pi = train_request(req, "natural")
    sizes = natural_sizes(prepared.config)
    assert pi == pytest.approx({n: s / sum(sizes.values()) for n, s in sizes.items()}, abs=1e-15)
    with open_run(prepared, models=prepared.classes["solver"].models, verbose=False) as (ctx, _):
        assert set(ctx.backend.replicas) == {"w"}  # one model: no u, no second optimizer

    result = train(req, "natural")
    out = Path(result["out_dir"])
    assert {"config.yaml", "metrics.jsonl", "test.json", "eval.json", "weights.json"} <= {p.name for p in out.iterdir()}
    config = (out / "config.yaml").read_text()
    assert "solver: train" in config and "weights: fixed" in config and "sampling: weighted" in config
    records = _records(out)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all("loss_u" not in r and math.isfinite(r["val_loss"]) and sum(r["count"].values()) == 8 for r in records)
    assert all(r["pi"] == pytest.approx(pi) for r in records)
    assert json.loads((out / "weights.json").read_text()) == pytest.approx(pi)
    test = json.loads((out / "test.json").read_text())
    assert set(test) == {"loss", "perplexity", "tokens", "samples"} and test["samples"] == 40  # a bilevel run's shape
    scores = json.loads((out / "eval.json").read_text())
    assert scores["test"] == test and set(scores["sources"]) == set(pi)
    assert all(s["samples"] == 16 and math.isfinite(s["loss"]) for s in scores["sources"].values())
    assert scores["trained_on"] == {"steps": 3, "samples": 24,
                                    "supervised_tokens": sum(r["supervised_tokens"] for r in records)}
    assert scores["validation"]["samples"] == 16


def test_all_weight_on_one_source_trains_only_on_it(tmp_path):
    (tmp_path / "w.json").write_text(json.dumps({"clean": 0.0, "shuffled": 1.0, "typos": 0.0}))
    train(tiny_request(tmp_path, "train.eval_samples=0", "train.val_every=0", steps=2), str(tmp_path / "w.json"))
    records = _records(tmp_path / "run")
    assert [r["count"] for r in records] == [{"clean": 0, "shuffled": 8, "typos": 0}] * 2
    assert all(math.isnan(r["val_loss"]) for r in records)  # val_every: 0


@pytest.mark.parametrize("weights, expected", [
    ({"clean": 0.5, "shuffled": 0.5, "extra": 0.0}, ["names sources the data does not have: extra",
                                                     "misses sources of the data: typos"]),
    ({"clean": 1.2, "shuffled": -0.4, "typos": 0.2}, ["negative or not finite: shuffled=-0.4"]),
    ({"clean": 0.5, "shuffled": 0.3, "typos": 0.1}, ["they sum to 0.9, not 1 (within 1e-06)"]),
])
def test_bad_weights_are_a_one_line_error_listing_them(tmp_path, capsys, weights, expected):
    from scalebio import cli

    path = tmp_path / "weights.json"
    path.write_text(json.dumps(weights))
    argv = ["train", "--weights", str(path), "--out", str(tmp_path / "run"), "--steps", "1"]
    assert cli.main(argv + [a for s in TINY for a in ("--set", s)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --weights {path}: ") and "\n" not in err
    assert all(e in err for e in expected), err
    assert not (tmp_path / "run").exists()  # refused before anything was built or written


def test_fixed_weights_given_in_the_config_are_checked_too(tmp_path):
    from scalebio.config import ConfigError
    from scalebio.runner import prepare

    with pytest.raises(ConfigError, match="fixed.weights: they sum to 1.1"):
        prepare(tiny_request(tmp_path, "fixed.weights={clean: 0.5, shuffled: 0.5, typos: 0.1}", plugins=["fixed"]))


def test_without_validation_or_test_it_says_what_it_will_not_report(tmp_path, capsys):
    data = _data_with_test(tmp_path, validation=False, test=False)
    train(tiny_request(tmp_path, "train.eval_samples=8", data=data, steps=2), "uniform")
    said = capsys.readouterr().out
    # the end table of a fixed-weights run must not claim the weights were learned
    assert "Source weights (fixed, not learned)" in said and "Learned source weights" not in said
    assert "no validation and no test set" in said and "validation loss" in said and "test loss (no test.json)" in said
    out = tmp_path / "run"
    assert not (out / "test.json").exists()
    assert all(math.isnan(r["val_loss"]) for r in _records(out))
    assert set(json.loads((out / "eval.json").read_text())) == {"model", "weights", "trained_on", "sources"}

    from scalebio.runner import prepare

    with pytest.raises(DataError, match="the minimax solver needs a validation set"):
        prepare(tiny_request(tmp_path / "bilevel", data=data))


def test_sampling_modes_are_checked_against_the_solver(tmp_path):
    from scalebio.config import ConfigError
    from scalebio.runner import prepare

    with pytest.raises(ConfigError, match="weighted does not work with the minimax solver"):
        prepare(tiny_request(tmp_path, "data.sampling=weighted"))
    with pytest.raises(ConfigError, match="uniform does not work with the train solver; it accepts weighted"):
        train_request(tiny_request(tmp_path, "data.sampling=uniform"), "uniform")


@pytest.mark.slow
def test_bf16_lisa_train_run_is_deterministic_and_seeded(tmp_path):
    def run(name, seed):
        req = tiny_request(tmp_path / name, "megatron.precision=bf16", "lisa.gamma=1", "lisa.interval=2",
                           "train.eval_samples=0", plugins=["lisa"], steps=4)
        req.seed = seed
        train(req, "uniform")
        timing = ("time_s", "tokens_per_s", "peak_memory_bytes")  # measurements, not results
        return [{k: v for k, v in r.items() if k not in timing} for r in _records(tmp_path / name / "run")]

    a, b, c = run("a", 1), run("b", 1), run("c", 2)
    assert a == b
    assert a != c and [r["count"] for r in a] != [r["count"] for r in c]
    assert [sorted(r["trainable_layers"]) for r in a if "trainable_layers" in r] == [["w"], ["w"]]
    assert all(len(r["trainable_layers"]["w"]) == 1 for r in a if "trainable_layers" in r)


# --------------------------------------------------------------------------- layouts and the final model


def _train_layout(rank, world, out, sets):
    req = tiny_request(Path(out), "run.micro_batch=2", "train.eval_samples=8", "train.val_every=1", *sets,
                       steps=3)
    req.out = str(out)
    train(req, str(Path(out).parents[1] / "w.json"))
    return rank


@pytest.mark.slow
@pytest.mark.parametrize("world, sets", [(2, ()), (2, ("megatron.pp=2",))], ids=["dp2", "pp2"])
def test_layouts_match_one_process(tmp_path, world, sets):
    from distributed import run_ranks

    (tmp_path / "w.json").write_text(json.dumps(PI))
    run_ranks(_train_layout, 1, str(tmp_path / "one" / "run"), (), timeout=400)
    run_ranks(_train_layout, world, str(tmp_path / "many" / "run"), sets, timeout=400)
    one, many = _records(tmp_path / "one" / "run"), _records(tmp_path / "many" / "run")
    for a, b in zip(one, many):
        assert a["count"] == b["count"]
        for key in ("train_loss_w", "val_loss"):
            assert abs(a[key] - b[key]) < 1e-5 * max(1, abs(a[key])), (key, a[key], b[key])
    ea = json.loads((tmp_path / "one" / "run" / "eval.json").read_text())
    eb = json.loads((tmp_path / "many" / "run" / "eval.json").read_text())
    assert all(abs(ea["sources"][n]["loss"] - eb["sources"][n]["loss"]) < 1e-5 for n in PI)
    assert abs(ea["validation"]["loss"] - eb["validation"]["loss"]) < 1e-5
    assert one[-1]["train_loss_w"] != one[0]["train_loss_w"]  # it trained, so equality means something


@pytest.mark.slow
def test_final_model_converts_to_transformers_and_eval_matches_it(tmp_path):
    import convert_helpers as ch
    from scalebio.runner import RunRequest, prepare
    from scalebio_plugins.megatron import hf

    hf_dir, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    ch.build_hf("qwen2", hf_dir)
    hf.hf_to_megatron(hf_dir, ckpt, progress=False, log=lambda *a: None)
    data = ch.data_yaml(tmp_path)
    req = RunRequest(data=str(data), load=str(ckpt), out=str(tmp_path / "run"), steps=2,
                     sets=ch.RUN_SETS + ("run.save_final=true", "optim.lr=1e-2", "optim.warmup=0",
                                         "train.eval_samples=null"))
    train(req, "uniform")
    final = tmp_path / "run" / "final"
    assert sorted(p.name for p in final.iterdir()) == ["w"]
    hf.megatron_to_hf(final / "w", tmp_path / "hf-w", progress=False, log=lambda *a: None)
    # transformers on the exported model computes the losses eval.json reports for the trained w
    cfg = prepare(ch.request(final / "w", data, tmp_path / "unused")).config
    expected = ch.hf_token_losses(tmp_path / "hf-w", RunData(cfg.data, load_tokenizer(cfg.data.tokenizer), 0))
    scores = json.loads((tmp_path / "run" / "eval.json").read_text())
    got = {**{n: s["loss"] for n, s in scores["sources"].items()}, "validation": scores["validation"]["loss"]}
    assert got.keys() == expected.keys()
    assert all(abs(got[n] - expected[n]) < 1e-4 for n in got), (got, expected)
    # negative control: the untrained checkpoint gives other losses
    before = ch.hf_token_losses(hf_dir, RunData(cfg.data, load_tokenizer(cfg.data.tokenizer), 0))
    assert max(abs(before[n] - expected[n]) for n in got) > 1e-3
    assert Counter(json.loads((tmp_path / "run" / "weights.json").read_text()).values()) == Counter([0.5, 0.5])
