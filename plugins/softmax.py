"""Weights plugin ``softmax``: pi = softmax(lambda), lambda updated by Adam (the paper's choice).

The solver hands over g = dF/dpi; the chain rule through the softmax gives
dF/dlambda_j = pi_j * (g_j - sum_k pi_k g_k), which for g = alpha * Delta is SPEC §2's
closed-form hypergradient. Adam then moves each logit by about lr per step, so after T steps
the spread of pi is bounded by roughly lr * T / 2 in logit space: the learned weights depend on
lr x T as much as on the data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from scalebio import hookimpl
from scalebio.config import ConfigError
from scalebio.roles import Weights


@dataclass
class SoftmaxOptions:
    lr: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled, on lambda (the reference code applied 0.01 by accident)
    init: Optional[dict[str, float]] = None  # starting pi by source name (normalised); default uniform


def initial_pi(init, source_names) -> torch.Tensor:
    """Uniform, or the given weights by source name (normalised)."""
    k = len(source_names)
    if init is None:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    unknown = sorted(set(init) - set(source_names))
    missing = [n for n in source_names if n not in init]
    if unknown or missing:
        raise ConfigError(f"init weights must name every source exactly: unknown {unknown}, missing {missing}")
    pi = torch.tensor([float(init[n]) for n in source_names], dtype=torch.float64)
    if (pi <= 0).any():
        raise ConfigError(f"init weights must be positive, got {dict(zip(source_names, pi.tolist()))}")
    return pi / pi.sum()


class Softmax(Weights):
    Options = SoftmaxOptions

    def __init__(self, options: SoftmaxOptions, source_names):
        super().__init__(options, source_names)
        self.logits = initial_pi(options.init, self.source_names).log()
        self.exp_avg = torch.zeros_like(self.logits)
        self.exp_avg_sq = torch.zeros_like(self.logits)
        self.steps = 0

    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=0)

    def grad_logits(self, grad_pi: torch.Tensor) -> torch.Tensor:
        """dF/dlambda from dF/dpi through the softmax."""
        pi = self.probs()
        g = grad_pi.to(torch.float64)
        return pi * (g - (pi * g).sum())

    def update(self, grad_pi: torch.Tensor, lr_scale: float) -> None:
        o = self.options
        g = self.grad_logits(grad_pi)
        lr = o.lr * lr_scale
        self.steps += 1
        self.logits.mul_(1.0 - lr * o.weight_decay)
        self.exp_avg.mul_(o.adam_beta1).add_(g, alpha=1.0 - o.adam_beta1)
        self.exp_avg_sq.mul_(o.adam_beta2).addcmul_(g, g, value=1.0 - o.adam_beta2)
        m_hat = self.exp_avg / (1.0 - o.adam_beta1 ** self.steps)
        v_hat = self.exp_avg_sq / (1.0 - o.adam_beta2 ** self.steps)
        self.logits.sub_(lr * m_hat / (v_hat.sqrt() + o.adam_eps))

    def state_dict(self) -> dict:
        return {"logits": self.logits.clone(), "exp_avg": self.exp_avg.clone(),
                "exp_avg_sq": self.exp_avg_sq.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.logits = state["logits"].clone().to(torch.float64)
        self.exp_avg = state["exp_avg"].clone().to(torch.float64)
        self.exp_avg_sq = state["exp_avg_sq"].clone().to(torch.float64)
        self.steps = int(state["steps"])
        if not math.isfinite(float(self.logits.sum())):
            raise ValueError("softmax weights state holds non-finite logits")


@hookimpl
def scalebio_weights():
    return Softmax
