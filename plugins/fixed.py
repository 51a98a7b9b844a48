"""Weights plugin ``fixed``: pi is given and never moves (the SFT baseline).

``fixed.weights`` maps every source to its weight: non-negative, adding up to 1 within 1e-6, as a
run's ``weights.json`` (unset: uniform). ``scalebio train --weights ...`` fills it in; there pi is
the sampling distribution of the training rows. With the bilevel solver it is a ScaleBiO run whose
weights never update: the loss is weighted by pi and the hypergradient is ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from scalebio import hookimpl
from scalebio.compare.weights import check_weights, weight_problems
from scalebio.config import ConfigError
from scalebio.roles import Weights


@dataclass
class FixedOptions:
    weights: Optional[dict[str, float]] = None  # pi by source name; null = uniform

    def validate(self):
        problems = weight_problems(self.weights) if self.weights is not None else []
        if problems:
            raise ConfigError(f"fixed.weights: {'; '.join(problems)}")


class Fixed(Weights):
    Options = FixedOptions
    learns = False

    def __init__(self, options: FixedOptions, source_names):
        super().__init__(options, source_names)
        k = len(self.source_names)
        if options.weights is None:
            self.pi = torch.full((k,), 1.0 / k, dtype=torch.float64)
        else:
            check_weights(options.weights, self.source_names, "fixed.weights")
            pi = torch.tensor([float(options.weights[n]) for n in self.source_names], dtype=torch.float64)
            self.pi = pi / pi.sum()  # within 1e-6 of 1 already; exactly on the simplex now

    def probs(self) -> torch.Tensor:
        return self.pi.clone()

    def update(self, grad_pi: torch.Tensor, lr_scale: float) -> None:
        pass  # fixed: the hypergradient is ignored


@hookimpl
def scalebio_weights():
    return Fixed
