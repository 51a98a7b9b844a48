"""Solver and weights plugin ``doremi``: DoReMi-style domain reweighting (Xie et al. 2023, "DoReMi:
Optimizing Data Mixtures Speeds Up Language Model Pretraining", Algorithm 1), as a baseline on the
same backend, data and layouts as the bilevel solver. docs/algorithm.md maps it to the paper.

With R = round(reference_fraction * run.steps):

- steps [0, R): the reference model u trains on uniform domain weights, loss (1/K) sum_k l_k(u)
  over the sources in the batch. R = 0 makes the starting weights (``--load``) the reference.
- steps [R, T): u is frozen. On each batch, before w moves:
  1. per-token losses of the reference u and the proxy w (forward only);
  2. excess loss per domain, lambda_k = mean over domain k's supervised tokens in the batch of
     max(l_w - l_ref, 0) (a domain absent from the batch keeps its last value, as the authors' code);
  3. exponentiated-gradient step with smoothing: alpha' = alpha * exp(eta * lambda) / Z,
     alpha <- (1 - c) alpha' + c / K;
  4. w takes one step on sum_k alpha_k * l_k(w) (alpha renormalised over the sources in the batch).
- weights.json holds the mean of alpha over steps [R, T), the paper's output.

The plugin takes two roles: the solver, and the weights (alpha and its average) it updates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from scalebio import hookimpl
from scalebio.config import ConfigError
from scalebio.roles import NonFiniteError, Solver, Weights, check_finite
from scalebio.schedule import lr_factor


@dataclass
class DoremiOptions:
    reference_fraction: float = 0.5  # share of run.steps that train the reference u (0: the starting weights)
    eta: float = 1.0  # step size of the exponentiated-gradient update (the paper's eta)
    smoothing: float = 1e-3  # the paper's c: alpha <- (1 - c) alpha + c / K
    val_every: int = 10  # validation loss of the model in training every N steps (forward only); 0 = never

    def validate(self):
        if not 0.0 <= self.reference_fraction < 1.0:
            raise ConfigError(f"doremi.reference_fraction must be in [0, 1), got {self.reference_fraction}")
        if self.eta <= 0:
            raise ConfigError(f"doremi.eta must be positive, got {self.eta}")
        if not 0.0 <= self.smoothing <= 1.0:
            raise ConfigError(f"doremi.smoothing must be in [0, 1], got {self.smoothing}")
        if self.val_every < 0:
            raise ConfigError(f"doremi.val_every must be >= 0, got {self.val_every}")


# --------------------------------------------------------------------------- the paper's formulas


def token_sources(batch) -> torch.Tensor:
    """Source id of every target position of ``batch`` ([B, S], -1 where there is none)."""
    if batch.segment is None:
        return batch.source[:, None].expand_as(batch.labels).clone()
    seg = batch.segment
    out = batch.segment_source.gather(1, seg.clamp(min=0))
    return torch.where(seg >= 0, out, torch.full_like(out, -1))


def excess_loss(proxy: torch.Tensor, reference: torch.Tensor, sources: torch.Tensor, mask: torch.Tensor, k: int):
    """Per domain, the mean over its supervised tokens of max(proxy - reference, 0).

    Returns (lambda, tokens), float64 of length ``k``; lambda is 0 where a domain has no token.
    """
    keep = (mask > 0) & (sources >= 0)
    src = sources[keep]
    clipped = (proxy - reference).clamp(min=0.0)[keep].double()
    total = torch.zeros(k, dtype=torch.float64).index_add_(0, src, clipped)
    tokens = torch.zeros(k, dtype=torch.float64).index_add_(0, src, torch.ones(len(src), dtype=torch.float64))
    return torch.where(tokens > 0, total / tokens.clamp(min=1.0), torch.zeros_like(total)), tokens


def domain_token_mean(loss: torch.Tensor, sources: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Token-mean loss per domain (NaN where a domain has no token)."""
    keep = (mask > 0) & (sources >= 0)
    src = sources[keep]
    total = torch.zeros(k, dtype=torch.float64).index_add_(0, src, loss[keep].double())
    tokens = torch.zeros(k, dtype=torch.float64).index_add_(0, src, torch.ones(len(src), dtype=torch.float64))
    return torch.where(tokens > 0, total / tokens.clamp(min=1.0), torch.full_like(total, float("nan")))


def eg_step(alpha: torch.Tensor, gain: torch.Tensor, eta: float, smoothing: float) -> torch.Tensor:
    """alpha' = alpha * exp(eta * gain) / Z, then (1 - c) alpha' + c / K (Algorithm 1, lines 7-8)."""
    logits = alpha.log() + eta * gain
    new = torch.softmax(logits, dim=0)
    return (1.0 - smoothing) * new + smoothing / len(alpha)


def present_coefficients(pi: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Loss coefficient of a sample: pi_s / N_s, pi renormalised over the sources in the batch."""
    present = counts > 0
    weight = torch.where(present, pi, torch.zeros_like(pi))
    weight = weight / weight.sum()
    return torch.where(present, weight / counts.clamp(min=1.0), torch.zeros_like(pi))


# --------------------------------------------------------------------------- roles


class DoremiWeights(Weights):
    """alpha, updated by :func:`eg_step`; the run reports the mean of alpha over the updates."""

    Options = DoremiOptions

    def __init__(self, options: DoremiOptions, source_names):
        super().__init__(options, source_names)
        k = len(self.source_names)
        self.alpha = torch.full((k,), 1.0 / k, dtype=torch.float64)
        self.alpha_sum = torch.zeros(k, dtype=torch.float64)
        self.updates = 0

    def probs(self) -> torch.Tensor:
        return self.alpha.clone()

    def update(self, grad_pi: torch.Tensor, lr_scale: float) -> None:
        # DoReMi maximises sum_k alpha_k lambda_k: the solver hands over grad_pi = -lambda
        self.alpha = eg_step(self.alpha, -grad_pi.to(torch.float64), self.options.eta * lr_scale,
                             self.options.smoothing)
        self.alpha_sum += self.alpha
        self.updates += 1

    def output(self) -> torch.Tensor:
        return self.alpha_sum / self.updates if self.updates else self.probs()

    def state_dict(self) -> dict:
        return {"alpha": self.alpha.clone(), "alpha_sum": self.alpha_sum.clone(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.alpha = state["alpha"].clone().to(torch.float64)
        self.alpha_sum = state["alpha_sum"].clone().to(torch.float64)
        self.updates = int(state["updates"])


class Doremi(Solver):
    Options = DoremiOptions
    needs_validation = False

    def __init__(self, options: DoremiOptions, run):
        super().__init__(options, run)
        steps = run.config.run.steps
        self.reference_steps = round(options.reference_fraction * steps)
        if self.reference_steps >= steps:
            raise ConfigError(f"doremi.reference_fraction={options.reference_fraction} leaves no proxy step of "
                              f"run.steps={steps}")
        # lambda of each domain, kept for a domain absent from a batch (as the authors' code does)
        self.excess = torch.zeros(len(run.source_names), dtype=torch.float64)

    def _val_loss(self, model: str, step: int, val_batch) -> float:
        every = self.options.val_every
        if val_batch is None or every == 0 or (step % every and step != self.run.config.run.steps - 1):
            return float("nan")
        return self.run.backend.evaluate(model, val_batch).val_loss

    def _optimizer_step(self, model: str, step: int, start: int, end: int) -> dict:
        opt = self.run.config.optim
        scale = lr_factor(step - start, end - start, opt.warmup, opt.schedule, opt.min_lr_ratio)
        lr = (opt.lr_u_value if model == "u" else opt.lr_w_value) * scale
        out = self.run.backend.optimizer_step(model, lr, opt.clip_grad)
        return {f"lr_{model}": lr, "lr_scale": scale, f"grad_norm_{model}": out["grad_norm"]}

    def step(self, step: int, batch, val_batch) -> dict:
        run = self.run
        backend, names, k = run.backend, run.source_names, len(run.source_names)
        counts = batch.source_counts(k)
        named = lambda t: {n: _num(t[i]) for i, n in enumerate(names)}  # noqa: E731
        count = {n: int(counts[i]) for i, n in enumerate(names)}
        if step < self.reference_steps:  # the reference: uniform domain weights
            res = backend.forward_backward("u", batch, present_coefficients(torch.full((k,), 1.0 / k), counts))
            _check(step, "u", names, res.mean(), counts, backend.grad_norm("u"))
            out = self._optimizer_step("u", step, 0, self.reference_steps)
            return {"phase": "reference", "loss_u": named(res.mean()), "count": count,
                    "val_loss": self._val_loss("u", step, val_batch), **out}
        sources, mask = token_sources(batch), batch.loss_mask
        reference = backend.token_losses("u", batch)
        proxy = backend.token_losses("w", batch)
        # every value is checked before it changes any state (a NonFiniteError leaves u, w, alpha
        # and the kept excess losses as they were): the token losses first, then w's pass, which
        # needs this step's alpha, so alpha's update is undone if that pass is non-finite
        lam, tokens = excess_loss(proxy, reference, sources, mask, k)
        for model, losses in (("u", reference), ("w", proxy)):
            _check(step, model, names, domain_token_mean(losses, sources, mask, k), tokens)
        excess = torch.where(tokens > 0, lam, self.excess)
        before = run.weights.state_dict()
        run.weights.update(-excess, 1.0)  # eta is constant in Algorithm 1: no schedule
        alpha = run.weights.probs()
        res = backend.forward_backward("w", batch, present_coefficients(alpha, counts))
        try:
            _check(step, "w", names, res.mean(), counts, backend.grad_norm("w"))
        except NonFiniteError:
            run.weights.load_state_dict(before)
            raise
        self.excess = excess
        out = self._optimizer_step("w", step, self.reference_steps, run.config.run.steps)
        return {"phase": "proxy", "loss_w": named(res.mean()), "loss_ref": named(domain_token_mean(reference, sources,
                                                                                              mask, k)),
                "excess": named(self.excess), "alpha": named(alpha), "count": count,
                "val_loss": self._val_loss("w", step, val_batch), **out}

    def state_dict(self) -> dict:
        return {"excess": self.excess.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.excess = state["excess"].clone().to(torch.float64)


def _check(step: int, model: str, names, mean: torch.Tensor, counts: torch.Tensor,
           grad_norm: float | None = None) -> None:
    """The loss of every source present in the batch (``counts`` > 0; an absent one's NaN is no
    divergence), then the gradient norm, must be finite."""
    values = {f"loss of source {n}": float(mean[i]) for i, n in enumerate(names) if counts[i] > 0}
    if grad_norm is not None:
        values["gradient norm"] = grad_norm
    check_finite(step, model, values, "lower the learning rate or check the data")


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


@hookimpl
def scalebio_solver():
    return Doremi


@hookimpl
def scalebio_weights():
    return DoremiWeights
