"""Solver plugin ``minimax``: ScaleBiO's fully first-order step (SPEC §2).

    F_alpha(w, u, lambda) = L1(w) + alpha * [L2(w, pi) - L2(u, pi)]

minimised over (w, lambda), maximised over u. Per step, on one train batch B shared by u and w
and a fresh validation batch V, all gradients are taken at (u_t, w_t, lambda_t):

1. u: gradient of L2(u, pi) on B, optimizer step (plain weighted fine-tuning);
2. w: gradient of L1(w)/alpha + L2(w, pi), the same minimiser as L1 + alpha * L2 with gradients on
   L2's scale; clipping is expressed on the unscaled objective (threshold clip_grad / alpha);
3. lambda: from the detached per-source mean losses of those same passes,
   Delta_k = l_k(w) - l_k(u) (0 for a source absent from B), dF/dpi = alpha * Delta, handed to the
   weights plugin, which applies its own chain rule (softmax: alpha * pi_j (Delta_j - pi . Delta)).

Sample i of source s is weighted pi_s / N_s with N_s the count of source s in the *global* batch,
so L2 is the pi-weighted sum of per-source mean losses whatever the micro-batch or parallel split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from scalebio import hookimpl
from scalebio.config import ConfigError
from scalebio.roles import Solver, check_finite
from scalebio.schedule import lr_factor


@dataclass
class MinimaxOptions:
    alpha: float = 100.0
    # alpha <- alpha_growth * alpha every alpha_stage_steps steps (the reference's tau); 0 = constant
    alpha_growth: float = 1.0
    alpha_stage_steps: int = 0
    # two-time-scale: update lambda every n steps with the mean hypergradient of those n steps
    lambda_every: int = 1
    # weight training rows by pi_s / (sum of pi over the sources present in the batch)
    renormalize_present: bool = False

    def validate(self):
        if self.alpha <= 0:
            raise ConfigError(f"minimax.alpha must be positive, got {self.alpha}")
        if self.lambda_every < 1:
            raise ConfigError(f"minimax.lambda_every must be >= 1, got {self.lambda_every}")
        if self.alpha_stage_steps < 0 or self.alpha_growth <= 0:
            raise ConfigError("minimax.alpha_stage_steps must be >= 0 and alpha_growth > 0")


def loss_coefficients(pi: torch.Tensor, counts: torch.Tensor, renormalize_present: bool = False):
    """Per-source coefficient of a training sample's loss: pi_s / N_s, 0 for absent sources.

    Returns (coef, pi_eff) where pi_eff is the weight each source carries in this batch.
    """
    present = counts > 0
    pi_eff = torch.where(present, pi, torch.zeros_like(pi))
    if renormalize_present:
        pi_eff = pi_eff / pi_eff.sum()
    coef = torch.where(present, pi_eff / counts.clamp(min=1.0), torch.zeros_like(pi))
    return coef, pi_eff


def pi_gradient(pi: torch.Tensor, delta: torch.Tensor, present: torch.Tensor, alpha: float,
                renormalize_present: bool = False) -> torch.Tensor:
    """dF/dpi for F = alpha * sum_k pi_eff_k * Delta_k over the sources present in the batch."""
    delta = torch.where(present, delta, torch.zeros_like(delta))
    if not renormalize_present:
        return alpha * delta
    s = pi[present].sum()
    mean = (pi * delta).sum() / s
    return torch.where(present, alpha * (delta - mean) / s, torch.zeros_like(delta))


class Minimax(Solver):
    Options = MinimaxOptions

    def __init__(self, options: MinimaxOptions, run):
        super().__init__(options, run)
        self._grad_sum = None
        self._grad_steps = 0

    def alpha_at(self, step: int) -> float:
        o = self.options
        stages = step // o.alpha_stage_steps if o.alpha_stage_steps else 0
        return o.alpha * o.alpha_growth ** stages

    def step(self, step: int, batch, val_batch) -> dict:
        run = self.run
        backend, weights, cfg = run.backend, run.weights, run.config
        opt = cfg.optim
        k = len(run.source_names)
        pi = weights.probs()
        counts = batch.source_counts(k)
        present = counts > 0
        coef, pi_eff = loss_coefficients(pi, counts, self.options.renormalize_present)
        alpha = self.alpha_at(step)
        scale = lr_factor(step, cfg.run.steps, opt.warmup, opt.schedule, opt.min_lr_ratio)
        val_tokens = val_batch.supervised_tokens()
        if val_tokens == 0:
            raise ValueError("the validation batch has no supervised tokens")

        # Both passes are taken at (u_t, w_t): nothing is updated before everything the step uses
        # has been checked (a NonFiniteError leaves u, w, their optimizers, lambda and this
        # solver's accumulator as they were: the run stops or skips the step, run.on_nonfinite).
        # 1. u: L2(u, pi)
        res_u = backend.forward_backward("u", batch, coef)
        mean_u = res_u.mean()  # NaN for a source absent from B: masked below, never a number
        check_finite(step, "u", {**_source_losses(run.source_names, mean_u, present),
                                 "gradient norm": backend.grad_norm("u")})
        # 2. w: L1(w) / alpha + L2(w, pi), the gradient of F_alpha / alpha
        res_w = backend.forward_backward("w", batch, coef, val_batch, 1.0 / (alpha * val_tokens))
        mean_w = res_w.mean()
        check_finite(step, "w", {**_source_losses(run.source_names, mean_w, present),
                                 "validation loss": res_w.val_loss, "gradient norm": backend.grad_norm("w")})
        # 3. the updates: u, w, then lambda in closed form from the same passes (no extra forward)
        step_u = backend.optimizer_step("u", opt.lr_u_value * scale, opt.clip_grad)
        step_w = backend.optimizer_step("w", opt.lr_w_value * scale, opt.clip_grad / alpha)
        zero = torch.zeros_like(mean_u)
        delta = torch.where(present, mean_w - mean_u, zero)  # 0 for an absent source (Delta_k, SPEC §2)
        grad_pi = pi_gradient(pi, delta, present, alpha, self.options.renormalize_present)
        self._grad_sum = grad_pi if self._grad_sum is None else self._grad_sum + grad_pi
        self._grad_steps += 1
        updated = False
        if self._grad_steps == self.options.lambda_every:
            weights.update(self._grad_sum / self._grad_steps, scale)
            self._grad_sum, self._grad_steps = None, 0
            updated = True

        l2_u = float((pi_eff * torch.where(present, mean_u, zero)).sum())
        l2_w = float((pi_eff * torch.where(present, mean_w, zero)).sum())
        names = run.source_names
        return {
            "loss_u": {n: _num(mean_u[i]) for i, n in enumerate(names)},
            "loss_w": {n: _num(mean_w[i]) for i, n in enumerate(names)},
            "count": {n: int(counts[i]) for i, n in enumerate(names)},
            "delta": {n: float(delta[i]) for i, n in enumerate(names)},
            "val_loss": res_w.val_loss,
            "train_loss_u": l2_u,
            "train_loss_w": l2_w,
            "alpha": alpha,
            "lr_u": opt.lr_u_value * scale,
            "lr_w": opt.lr_w_value * scale,
            "lr_scale": scale,
            "lambda_updated": updated,
            "grad_norm_u": step_u["grad_norm"],
            # w's pass has the gradient of F_alpha / alpha: times alpha, the norm of the gradient of
            # the unscaled objective L1 + alpha * L2, the quantity clip_grad applies to
            "grad_norm_w": alpha * step_w["grad_norm"],
        }

    def state_dict(self) -> dict:
        return {"grad_sum": self._grad_sum, "grad_steps": self._grad_steps}

    def load_state_dict(self, state: dict) -> None:
        self._grad_sum, self._grad_steps = state["grad_sum"], int(state["grad_steps"])


def _source_losses(names, mean: torch.Tensor, present: torch.Tensor) -> dict:
    """The mean loss of each source present in the batch, for the finiteness check."""
    return {f"loss of source {n}": float(mean[i]) for i, n in enumerate(names) if bool(present[i])}


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


@hookimpl
def scalebio_solver():
    return Minimax
