"""Weights plugin ``simplex``: pi kept on the probability simplex directly.

``mirror`` (default) is exponentiated gradient, mirror descent under the entropy:
pi <- pi * exp(-lr * g) / Z. ``projection`` is projected gradient descent with the Euclidean
projection onto the simplex. Both take g = dF/dpi = alpha * Delta from the solver. With
``floor`` > 0, pi is mixed with the uniform distribution after each update so that no source
ever drops below ``floor``: pi <- (1 - K * floor) * pi + floor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from scalebio import hookimpl
from scalebio.config import ConfigError
from scalebio.roles import Weights

from .softmax import initial_pi


@dataclass
class SimplexOptions:
    lr: float = 1e-2
    method: Literal["mirror", "projection"] = "mirror"
    floor: float = 0.0
    init: Optional[dict[str, float]] = None  # starting pi by source name (normalised); default uniform

    def validate(self):
        if self.lr <= 0:
            raise ConfigError(f"simplex.lr must be positive, got {self.lr}")
        if self.floor < 0:
            raise ConfigError(f"simplex.floor must be >= 0, got {self.floor}")


def project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto {x >= 0, sum x = 1} (sort-based, exact)."""
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, dim=0) - 1.0
    idx = torch.arange(1, len(v) + 1, dtype=v.dtype)
    rho = int(torch.nonzero(u - css / idx > 0).max())
    theta = css[rho] / (rho + 1)
    return torch.clamp(v - theta, min=0.0)


class Simplex(Weights):
    Options = SimplexOptions

    def __init__(self, options: SimplexOptions, source_names):
        super().__init__(options, source_names)
        k = len(self.source_names)
        if options.floor * k >= 1.0:
            raise ConfigError(f"simplex.floor={options.floor} is impossible for {k} sources: "
                              f"it must be below 1/K = {1.0 / k:.4g}")
        self.pi = self._apply_floor(initial_pi(options.init, self.source_names))

    def _apply_floor(self, pi: torch.Tensor) -> torch.Tensor:
        f = self.options.floor
        return (1.0 - len(pi) * f) * pi + f if f > 0 else pi

    def probs(self) -> torch.Tensor:
        return self.pi.clone()

    def update(self, grad_pi: torch.Tensor, lr_scale: float) -> None:
        g = grad_pi.to(torch.float64)
        lr = self.options.lr * lr_scale
        if self.options.method == "mirror":
            step = -lr * g
            pi = self.pi * torch.exp(step - step.max())  # shift for stability; Z absorbs it
            pi = pi / pi.sum()
        else:
            pi = project_to_simplex(self.pi - lr * g)
        self.pi = self._apply_floor(pi)

    def state_dict(self) -> dict:
        return {"pi": self.pi.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.pi = state["pi"].clone().to(torch.float64)


@hookimpl
def scalebio_weights():
    return Simplex
