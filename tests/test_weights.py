"""Weights plugins: the softmax chain rule and Adam, the simplex updates, state round trips."""
from __future__ import annotations

import pytest
import torch

from scalebio.config import ConfigError
from scalebio_plugins.simplex import Simplex, SimplexOptions, project_to_simplex
from scalebio_plugins.softmax import Softmax, SoftmaxOptions

NAMES = ["a", "b", "c", "d"]


def test_softmax_grad_matches_autograd_and_spec_formula():
    w = Softmax(SoftmaxOptions(init={"a": 1, "b": 2, "c": 3, "d": 4}), NAMES)
    delta = torch.tensor([0.3, -0.1, 0.7, 0.0], dtype=torch.float64)
    alpha = 100.0
    lam = w.logits.clone().requires_grad_(True)
    f = alpha * (torch.softmax(lam, 0) * delta).sum()
    (auto,) = torch.autograd.grad(f, lam)
    pi = w.probs()
    spec = alpha * pi * (delta - (pi * delta).sum())  # SPEC §2: g_j = alpha pi_j (Delta_j - sum_k pi_k Delta_k)
    assert torch.allclose(w.grad_logits(alpha * delta), auto, atol=1e-12)
    assert torch.allclose(spec, auto, atol=1e-12)


def test_softmax_adam_first_step_moves_each_logit_by_lr_against_its_gradient():
    w = Softmax(SoftmaxOptions(lr=0.05), NAMES)
    g_pi = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    g = w.grad_logits(g_pi)
    before = w.logits.clone()
    w.update(g_pi, lr_scale=0.5)
    step = before - w.logits
    # bias-corrected Adam's first step is lr * g / (|g| + eps) elementwise
    assert torch.allclose(step, 0.025 * g / (g.abs() + 1e-8), atol=1e-9)
    assert abs(float(w.probs().sum()) - 1.0) < 1e-12
    assert w.probs()[1] > w.probs()[0]  # lower loss difference -> more weight


def test_softmax_state_round_trip_continues_identically():
    a = Softmax(SoftmaxOptions(lr=0.1, weight_decay=0.01), NAMES)
    gs = [torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    for g in gs[:3]:
        a.update(g, 1.0)
    b = Softmax(SoftmaxOptions(lr=0.1, weight_decay=0.01), NAMES)
    b.load_state_dict(a.state_dict())
    for g in gs[3:]:
        a.update(g, 1.0)
        b.update(g, 1.0)
    assert torch.equal(a.probs(), b.probs())


def test_init_weights_must_name_every_source():
    with pytest.raises(ConfigError, match="missing"):
        Softmax(SoftmaxOptions(init={"a": 1.0}), NAMES)


def test_mirror_descent_is_exponentiated_gradient():
    w = Simplex(SimplexOptions(lr=0.5, normalize="none"), NAMES)
    g = torch.tensor([1.0, 0.0, -1.0, 2.0], dtype=torch.float64)
    w.update(g, 1.0)
    expected = torch.exp(-0.5 * g) / torch.exp(-0.5 * g).sum()
    assert torch.allclose(w.probs(), expected, atol=1e-12)


def test_projection_is_euclidean_projection():
    v = torch.tensor([0.9, 0.6, -0.2, 0.1], dtype=torch.float64)
    p = project_to_simplex(v)
    assert abs(float(p.sum()) - 1.0) < 1e-12 and (p >= 0).all()
    # optimality: no feasible point on a grid of directions is closer
    for _ in range(200):
        q = torch.rand(4, dtype=torch.float64)
        q = q / q.sum()
        assert (q - v).norm() >= (p - v).norm() - 1e-12
    w = Simplex(SimplexOptions(lr=0.1, method="projection", normalize="none"), NAMES)
    w.update(torch.tensor([5.0, 0.0, 0.0, 0.0], dtype=torch.float64), 1.0)
    assert torch.allclose(w.probs(), project_to_simplex(torch.tensor([0.25 - 0.5, 0.25, 0.25, 0.25],
                                                                     dtype=torch.float64)))


def test_floor_keeps_every_source_above_it():
    w = Simplex(SimplexOptions(lr=1.0, floor=0.02, normalize="none"), NAMES)
    for _ in range(50):
        w.update(torch.tensor([10.0, 0.0, 0.0, 0.0], dtype=torch.float64), 1.0)
    pi = w.probs()
    assert float(pi.min()) >= 0.02 - 1e-12 and abs(float(pi.sum()) - 1.0) < 1e-12
    with pytest.raises(ConfigError, match="below 1/K"):
        Simplex(SimplexOptions(floor=0.25), NAMES)


def _trajectory(opts: SimplexOptions, grads) -> list:
    w = Simplex(opts, NAMES)
    out = []
    for g in grads:
        w.update(g, 1.0)
        out.append(w.probs())
    return out


def _grads(scale: float, n: int = 30) -> list:
    gen = torch.Generator().manual_seed(0)
    signal = torch.tensor([-1.0, 0.2, 0.3, 0.5], dtype=torch.float64)
    return [scale * (signal + torch.randn(4, dtype=torch.float64, generator=gen)) for _ in range(n)]


@pytest.mark.parametrize("method", ["mirror", "projection"])
def test_rms_normalised_step_is_scale_free(method):
    """Delta of 1e-4 (a pretrained model) and of 1 (from scratch) give the same trajectory of pi."""
    opts = SimplexOptions(lr=0.05, method=method)
    small, large = _trajectory(opts, _grads(1e-4)), _trajectory(opts, _grads(1.0))
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(small, large))
    assert float(small[-1][0]) > 0.3 and float(small[-1][3]) < 0.2  # and it does move, in the right direction
    # negative control: the plain step at the same lr moves pi by lr * g, so the two scales differ
    plain = SimplexOptions(lr=0.05, method=method, normalize="none")
    small, large = _trajectory(plain, _grads(1e-4)), _trajectory(plain, _grads(1.0))
    assert (small[-1] - 0.25).abs().max() < 1e-3 < (large[-1] - 0.25).abs().max()


def test_rms_first_step_and_running_mean_square():
    w = Simplex(SimplexOptions(lr=0.1, beta2=0.9), NAMES)
    g1 = torch.tensor([3.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    w.update(g1, 1.0)
    c1 = g1 - g1.mean()
    rms1 = float((c1 * c1).mean()) ** 0.5  # bias-corrected: the first mean square itself
    expected = torch.softmax(-0.1 * g1 / rms1, 0) * 4 * 0.25  # uniform start
    assert torch.allclose(w.probs(), expected / expected.sum(), atol=1e-12)
    g2 = torch.tensor([0.0, 2.0, 0.0, 0.0], dtype=torch.float64)
    before = w.probs()
    w.update(g2, 0.5)  # lr_scale (the schedule) multiplies the step
    c2 = g2 - g2.mean()
    v = (0.9 * 0.1 * float((c1 * c1).mean()) + 0.1 * float((c2 * c2).mean())) / (1 - 0.9 ** 2)
    step = before * torch.exp(-0.05 * g2 / v ** 0.5)
    assert torch.allclose(w.probs(), step / step.sum(), atol=1e-12)


def test_simplex_state_round_trip_continues_identically():
    grads = _grads(1e-3, 8)
    a = Simplex(SimplexOptions(lr=0.1), NAMES)
    for g in grads[:4]:
        a.update(g, 1.0)
    b = Simplex(SimplexOptions(lr=0.1), NAMES)
    b.load_state_dict(a.state_dict())
    for g in grads[4:]:
        a.update(g, 1.0)
        b.update(g, 1.0)
    assert torch.equal(a.probs(), b.probs())
    fresh = Simplex(SimplexOptions(lr=0.1), NAMES)  # negative control: pi alone loses the RMS
    fresh.load_state_dict({"pi": a.state_dict()["pi"]})
    fresh.update(grads[0], 1.0)
    a.update(grads[0], 1.0)
    assert not torch.allclose(fresh.probs(), a.probs())
