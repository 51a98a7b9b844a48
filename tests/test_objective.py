"""The ScaleBiO objective as the backend computes it, checked against autograd by hand.

- per-source normalisation: gradient of sum_k pi_k * mean_k(loss) with global N_s, an absent
  source, and several micro-batches;
- the closed-form lambda hypergradient equals autograd through the weighted objective built from
  the real per-sample losses of u and w.
"""
from __future__ import annotations

import pytest
import torch

from scalebio.data import collate
from scalebio_plugins.minimax import loss_coefficients, pi_gradient


def _per_sample_losses(chunk, batch):
    """Per-sample mean CE over supervised tokens, straight from the GPTModel (no schedule)."""
    seq = batch.tokens.shape[1]
    pos = torch.arange(seq).unsqueeze(0).expand(len(batch), -1)
    per_token = chunk(batch.tokens, pos, None, labels=batch.labels).float()
    mask = batch.loss_mask
    return (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)


def _batch(data, sources):
    """A batch whose rows come from the given source ids (in that order)."""
    taken = {}
    samples = []
    for s in sources:
        i = taken.get(s, 0)
        taken[s] = i + 1
        samples.append(data.train[s].samples[i])
    return collate(samples, sources, data.seq_length, data.pad_id)


def test_loss_coefficients_hand_computed():
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    counts = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    coef, pi_eff = loss_coefficients(pi, counts)
    assert torch.allclose(coef, torch.tensor([0.25, 0.3, 0.0], dtype=torch.float64))
    assert torch.allclose(pi_eff, torch.tensor([0.5, 0.3, 0.0], dtype=torch.float64))
    coef, pi_eff = loss_coefficients(pi, counts, renormalize_present=True)
    assert torch.allclose(coef, torch.tensor([0.5 / 0.8 / 2, 0.3 / 0.8, 0.0], dtype=torch.float64))
    # an absent source gets no hypergradient, whatever its loss difference
    g = pi_gradient(pi, torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64), counts > 0, alpha=10.0)
    assert g.tolist() == [10.0, 20.0, 0.0]


def test_renormalised_pi_gradient_matches_autograd():
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64, requires_grad=True)
    delta = torch.tensor([0.7, -0.2, 3.0], dtype=torch.float64)
    present = torch.tensor([True, True, False])
    f = 4.0 * (torch.where(present, pi, 0) / torch.where(present, pi, 0).sum() * torch.where(present, delta, 0)).sum()
    (auto,) = torch.autograd.grad(f, pi)
    closed = pi_gradient(pi.detach(), delta, present, alpha=4.0, renormalize_present=True)
    assert torch.allclose(auto, closed, atol=1e-12)


def test_backend_gradient_uses_global_counts_and_skips_absent_sources(tiny_run):
    ctx, data = tiny_run()
    backend = ctx.backend
    backend.set_trainable("u", frozenset(range(4)), keep_state=False)
    # 8 rows in 2 micro-batches of 4: source 0 five times, source 1 three times, source 2 absent.
    # Per-micro-batch counts (3/1 then 2/2) would give a different gradient from global ones (5/3).
    batch = _batch(data, [0, 0, 0, 1, 1, 0, 0, 1])
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    counts = batch.source_counts(3)
    assert counts.tolist() == [5.0, 3.0, 0.0]
    coef, _ = loss_coefficients(pi, counts)

    chunk = backend.replicas["u"].chunks[0]
    params = [p for p in chunk.parameters() if p.requires_grad]
    losses = _per_sample_losses(chunk, batch)
    src = batch.source
    expected_loss = 0.5 * losses[src == 0].mean() + 0.3 * losses[src == 1].mean()  # source 2 absent
    expected = torch.autograd.grad(expected_loss, params)

    result = backend.forward_backward("u", batch, coef)
    assert result.count.tolist() == [5.0, 3.0, 0.0]
    assert torch.allclose(result.mean()[:2], torch.stack([losses[src == 0].mean(), losses[src == 1].mean()])
                          .double().detach(), atol=1e-5)
    assert torch.isnan(result.mean()[2])
    for p, g in zip(params, expected):
        assert torch.allclose(p.main_grad, g, atol=1e-6, rtol=1e-4), "gradient differs from the hand-computed one"


def test_validation_term_is_token_mean_scaled_by_alpha(tiny_run):
    ctx, data = tiny_run()
    backend = ctx.backend
    backend.set_trainable("w", frozenset(range(4)), keep_state=False)
    batch = _batch(data, [0, 1, 2, 0, 1, 2, 0, 0])
    val = data.next_val(4)
    pi = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    coef, _ = loss_coefficients(pi, batch.source_counts(3))
    alpha = 7.0
    chunk = backend.replicas["w"].chunks[0]
    params = [p for p in chunk.parameters() if p.requires_grad]
    seq = val.tokens.shape[1]
    pos = torch.arange(seq).unsqueeze(0).expand(len(val), -1)
    val_ce = (chunk(val.tokens, pos, None, labels=val.labels).float() * val.loss_mask).sum()
    losses = _per_sample_losses(chunk, batch)
    l2 = sum(pi[k] * losses[batch.source == k].mean() for k in range(3))
    expected = torch.autograd.grad(val_ce / val.supervised_tokens() / alpha + l2, params)
    result = backend.forward_backward("w", batch, coef, val, 1.0 / (alpha * val.supervised_tokens()))
    assert abs(result.val_loss - float(val_ce.detach()) / val.supervised_tokens()) < 1e-5
    for p, g in zip(params, expected):
        assert torch.allclose(p.main_grad, g, atol=1e-6, rtol=1e-4)


def test_closed_form_hypergradient_equals_autograd(tiny_run):
    ctx, data = tiny_run(plugins=["softmax"])
    backend, weights, solver = ctx.backend, ctx.weights, ctx.solver
    for m in ("u", "w"):
        backend.set_trainable(m, frozenset(range(4)), keep_state=False)
    # two real steps so that u and w differ
    for step in range(2):
        solver.step(step, data.next_train(8), data.next_val(4))
    batch = _batch(data, [0, 0, 1, 2, 2, 2, 0, 1])
    alpha = solver.alpha_at(2)
    res_u = backend.evaluate("u", batch)
    res_w = backend.evaluate("w", batch)
    pi = weights.probs()
    counts = batch.source_counts(3)
    closed = weights.grad_logits(pi_gradient(pi, res_w.mean() - res_u.mean(), counts > 0, alpha))

    with torch.no_grad():
        lu = _per_sample_losses(backend.replicas["u"].chunks[0], batch).double()
        lw = _per_sample_losses(backend.replicas["w"].chunks[0], batch).double()
    lam = weights.logits.clone().requires_grad_(True)
    p = torch.softmax(lam, 0)
    # F = alpha * [L2(w, pi) - L2(u, pi)] with L2 = sum_i pi_{s_i} / N_{s_i} * loss_i (L1 has no lambda)
    f = alpha * (p[batch.source] / counts[batch.source] * (lw - lu)).sum()
    (auto,) = torch.autograd.grad(f, lam)
    assert torch.allclose(closed, auto, rtol=1e-4, atol=1e-9), (closed, auto)
    assert auto.abs().max() > 0


def test_non_finite_loss_stops_the_run(tiny_run):
    from scalebio.roles import NonFiniteError

    ctx, data = tiny_run()
    for m in ("u", "w"):
        ctx.backend.set_trainable(m, frozenset(range(4)), keep_state=False)
    with torch.no_grad():
        ctx.backend.replicas["w"].chunks[0].decoder.final_layernorm.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="step 0: loss of source clean of model w is nan"):
        ctx.solver.step(0, data.next_train(8), data.next_val(4))
