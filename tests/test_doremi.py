"""The ``doremi`` baseline: the paper's formulas against hand-computed numbers, per-token losses
from the backend (against per-sample means, and across layouts), and a run whose phases train
exactly the model they say and whose weights.json is the average of alpha."""
from __future__ import annotations

import importlib.metadata
import json
import math
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import tiny_request
from scalebio.roles import Batch
from scalebio_plugins.doremi import (DoremiOptions, DoremiWeights, eg_step, excess_loss, present_coefficients,
                                     token_sources)


def test_excess_loss_is_the_clipped_per_token_mean_of_each_domain():
    proxy = torch.tensor([[2.0, 1.0, 3.0, 9.0], [1.0, 4.0, 0.5, 0.0]])
    reference = torch.tensor([[1.0, 2.0, 1.0, 0.0], [2.0, 1.0, 1.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])  # the 9.0 is not a supervised target
    sources = torch.tensor([[0, 0, 0, 0], [2, 2, 2, 2]])
    lam, tokens = excess_loss(proxy, reference, sources, mask, 3)
    # domain 0: max(1, 0) + max(-1, 0) + max(2, 0) over 3 tokens; domain 2: (0 + 3 + 0) / 3; domain 1 absent
    assert lam.tolist() == [1.0, 0.0, 1.0] and tokens.tolist() == [3.0, 0.0, 3.0]
    # negative control: without the clip, domain 0 would be (1 - 1 + 2) / 3 and domain 2 (-1 + 3 - 1) / 3
    unclipped = [((proxy - reference) * mask)[0].sum() / 3, ((proxy - reference) * mask)[1].sum() / 3]
    assert [float(u) for u in unclipped] != [lam[0], lam[2]]


def test_exponentiated_gradient_step_with_smoothing():
    alpha = torch.tensor([0.5, 0.5], dtype=torch.float64)
    got = eg_step(alpha, torch.tensor([1.0, 0.0], dtype=torch.float64), eta=1.0, smoothing=0.1)
    e = math.e
    assert got.tolist() == pytest.approx([0.9 * e / (e + 1) + 0.05, 0.9 / (e + 1) + 0.05], abs=1e-15)
    # smoothing keeps every weight at least c / K, however large the excess
    far = eg_step(alpha, torch.tensor([500.0, 0.0], dtype=torch.float64), eta=1.0, smoothing=0.1)
    assert far[1] == pytest.approx(0.05) and torch.isfinite(far).all()


def test_weights_report_the_average_of_their_iterates():
    w = DoremiWeights(DoremiOptions(eta=0.5, smoothing=0.01), ["a", "b", "c"])
    assert w.output().tolist() == pytest.approx([1 / 3] * 3)  # nothing averaged yet: the start
    seen = []
    for gain in ([1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.5, 0.5, 3.0]):
        w.update(-torch.tensor(gain, dtype=torch.float64), 1.0)  # the solver hands over -lambda
        seen.append(w.probs())
    assert torch.allclose(w.output(), torch.stack(seen).mean(0), atol=1e-15, rtol=0)
    assert not torch.allclose(w.output(), w.probs())  # the average, not the last iterate
    state = w.state_dict()
    other = DoremiWeights(DoremiOptions(eta=0.5, smoothing=0.01), ["a", "b", "c"])
    other.load_state_dict(state)
    assert torch.equal(other.output(), w.output()) and torch.equal(other.probs(), w.probs())


def test_proxy_loss_weights_renormalise_over_the_sources_in_the_batch():
    coef = present_coefficients(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
                                torch.tensor([4.0, 0.0, 2.0], dtype=torch.float64))
    assert coef.tolist() == pytest.approx([0.5 / 0.7 / 4, 0.0, 0.2 / 0.7 / 2])


def test_token_sources_of_packed_rows():
    segment = torch.tensor([[0, 0, 1, 1, -1], [0, 0, 0, 0, 0]])
    batch = Batch(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5),
                  torch.tensor([2, 1]), segment, torch.zeros(2, 5, dtype=torch.long), torch.tensor([[2, 0], [1, -1]]))
    assert token_sources(batch).tolist() == [[2, 2, 0, 0, -1], [1, 1, 1, 1, 1]]
    plain = Batch(batch.tokens, batch.labels, batch.loss_mask, torch.tensor([2, 1]))
    assert token_sources(plain).tolist() == [[2] * 5, [1] * 5]


# --------------------------------------------------------------------------- backend per-token losses


@pytest.mark.parametrize("sets", [(), ("megatron.precision=bf16",),
                                  ("data.packing=true", "megatron.transformer_impl=local")], ids=["fp32", "bf16", "packed"])
def test_token_losses_give_the_per_sample_means_of_a_pass(tiny_run, sets):
    ctx, data = tiny_run(*sets)
    batch = data.next_train(8)
    stats = ctx.backend.evaluate("w", batch)
    tok = ctx.backend.token_losses("w", batch)
    assert tok.shape == batch.loss_mask.shape and tok.dtype == torch.float32
    assert (tok[batch.loss_mask == 0] == 0).all()
    src = token_sources(batch)
    if batch.packed:  # per packed sample: its tokens' sum over its supervised tokens
        seg = batch.segment
        means, owners = [], []
        for i in range(len(batch)):
            for j in range(int(seg[i].max()) + 1):
                m = (seg[i] == j) & (batch.loss_mask[i] > 0)
                means.append(float(tok[i][m].sum() / m.sum()))
                owners.append(int(batch.segment_source[i, j]))
    else:
        means = (tok.sum(1) / batch.loss_mask.sum(1)).tolist()
        owners = batch.source.tolist()
    expected = torch.zeros(3, dtype=torch.float64)
    for mean, owner in zip(means, owners):
        expected[owner] += mean
    assert torch.allclose(expected, stats.loss_sum, rtol=1e-5, atol=1e-5)
    assert (src[batch.loss_mask > 0] >= 0).all()
    # negative control: another batch gives other token losses
    assert not torch.allclose(ctx.backend.token_losses("w", data.next_train(8)), tok)


def _token_losses_layout(rank, world, out, sets):
    from scalebio.runner import open_run, prepare

    req = tiny_request(Path(out), "run.micro_batch=2", *sets, plugins=["doremi"])
    with open_run(prepare(req), verbose=False) as (ctx, data):
        for m in ("u", "w"):
            ctx.backend.set_trainable(m, frozenset(range(4)), True)
        batch = data.next_train(8)
        first = ctx.backend.token_losses("w", batch)
        # one proxy step, so the second call sees trained weights on every rank
        ctx.solver.reference_steps = 0
        ctx.solver.step(0, batch, None)
        return first, ctx.backend.token_losses("w", batch)


@pytest.mark.slow
@pytest.mark.parametrize("world, sets", [(2, ()), (2, ("megatron.tp=2",)), (4, ("megatron.tp=2", "megatron.pp=2"))],
                         ids=["dp2", "tp2", "tp2pp2"])
def test_token_losses_and_a_proxy_step_match_one_process(tmp_path, world, sets):
    from distributed import run_ranks

    (one,) = run_ranks(_token_losses_layout, 1, str(tmp_path / "one"), (), timeout=400)
    many = run_ranks(_token_losses_layout, world, str(tmp_path / "many"), sets, timeout=400)
    for first, after in many:  # identical on every rank, and equal to one process
        assert torch.allclose(first, one[0], atol=1e-5) and torch.allclose(after, one[1], atol=1e-5)
    assert (one[0] - one[1]).abs().max() > 1e-4  # the step changed w, so equality means something


# --------------------------------------------------------------------------- a run

WATCH = """
from scalebio import hookimpl

SUMS = []

@hookimpl
def scalebio_step_end(run, step, metrics):
    SUMS.append({m: sum(float(p.double().sum()) for p in run.backend.replicas[m].parameters()) for m in ("u", "w")})
"""


def test_doremi_run_trains_the_reference_then_the_proxy_and_reports_the_average(tmp_path, monkeypatch):
    from scalebio.plugins import Plugins, discover
    from scalebio.runner import execute, prepare

    (tmp_path / "doremi_watch.py").write_text(textwrap.dedent(WATCH))
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = list(importlib.metadata.entry_points(group="scalebio"))
    eps.append(importlib.metadata.EntryPoint("watch", "doremi_watch", "scalebio"))
    plugins = Plugins(["doremi"], infos=discover(eps))
    req = tiny_request(tmp_path, "doremi.reference_fraction=0.4", "doremi.eta=5", plugins=["doremi"], steps=5)
    result = execute(prepare(req, plugins=plugins))

    import doremi_watch

    sums = doremi_watch.SUMS
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["reference"] * 2 + ["proxy"] * 3
    # reference phase: only u moves; proxy phase: only w moves
    assert sums[0]["w"] == sums[1]["w"] and sums[0]["u"] != sums[1]["u"]
    assert sums[1]["u"] == sums[2]["u"] == sums[4]["u"] and len({s["w"] for s in sums[1:]}) == 4
    assert all("grad_norm_u" in r for r in records[:2]) and all("grad_norm_w" in r for r in records[2:])
    # weights.json is the mean of the alphas the proxy trained with, not the last one
    alphas = torch.tensor([[r["alpha"][n] for n in sorted(r["alpha"])] for r in records[2:]], dtype=torch.float64)
    weights = json.loads((tmp_path / "run" / "weights.json").read_text())
    assert [weights[n] for n in sorted(weights)] == pytest.approx(alphas.mean(0).tolist(), abs=1e-12)
    assert result["weights"] == weights and not torch.allclose(alphas[-1], alphas.mean(0))
    # the pi of a step is alpha before that step's update
    assert [records[3]["pi"][n] for n in sorted(weights)] == pytest.approx(alphas[0].tolist())
    assert all(v >= 0 for r in records[2:] for v in r["excess"].values())
