"""Weights plugin ``simplex``: pi kept on the probability simplex directly.

``mirror`` (default) is exponentiated gradient, mirror descent under the entropy:
pi <- pi * exp(-lr * s) / Z. ``projection`` is projected gradient descent with the Euclidean
projection onto the simplex: pi <- P(pi - lr * s). Both take g = dF/dpi = alpha * Delta from the
solver.

``normalize: rms`` (default) makes the step scale-free: s = g / sqrt(v_hat), with v a running mean
(Adam's beta2, bias-corrected) of the mean square of the centred hypergradient g - mean(g). Delta
of a pretrained model is 1e-4..1e-2 and changes by orders of magnitude with the model, the data,
alpha and the layer selection, so a plain step lr * g either never moves pi or saturates it; with
the RMS each step moves log(pi_j / pi_k) by about lr * (g_j - g_k) / RMS, i.e. at most a few lr,
whatever Delta's scale. One scalar for all sources (not Adam's per-coordinate RMS) keeps the
relative size of the sources' signals: a source with no signal is not pushed as hard as one with.
``normalize: none`` is the plain step, s = g.

With ``floor`` > 0, pi is mixed with the uniform distribution after each update so that no source
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
    normalize: Literal["rms", "none"] = "rms"  # scale-free step (module doc); none: the plain lr * g
    beta2: float = 0.999  # decay of the running mean square (normalize: rms)
    eps: float = 1e-12  # added to the RMS; a hypergradient below it does not move pi
    floor: float = 0.0
    init: Optional[dict[str, float]] = None  # starting pi by source name (normalised); default uniform

    def validate(self):
        if self.lr <= 0:
            raise ConfigError(f"simplex.lr must be positive, got {self.lr}")
        if self.floor < 0:
            raise ConfigError(f"simplex.floor must be >= 0, got {self.floor}")
        if not 0.0 <= self.beta2 < 1.0:
            raise ConfigError(f"simplex.beta2 must be in [0, 1), got {self.beta2}")
        if self.eps <= 0:
            raise ConfigError(f"simplex.eps must be positive, got {self.eps}")


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
        self.sq_avg = 0.0  # running mean square of the centred hypergradient (normalize: rms)
        self.steps = 0

    def _apply_floor(self, pi: torch.Tensor) -> torch.Tensor:
        f = self.options.floor
        return (1.0 - len(pi) * f) * pi + f if f > 0 else pi

    def probs(self) -> torch.Tensor:
        return self.pi.clone()

    def scaled(self, grad_pi: torch.Tensor) -> torch.Tensor:
        """The step direction s: g itself, or g over the running RMS of the centred g."""
        o = self.options
        g = grad_pi.to(torch.float64)
        if o.normalize == "none":
            return g
        self.steps += 1
        centred = g - g.mean()  # mirror descent ignores a common shift; the RMS should too
        self.sq_avg = o.beta2 * self.sq_avg + (1.0 - o.beta2) * float((centred * centred).mean())
        rms = (self.sq_avg / (1.0 - o.beta2 ** self.steps)) ** 0.5
        return g / (rms + o.eps)

    def update(self, grad_pi: torch.Tensor, lr_scale: float) -> None:
        g = self.scaled(grad_pi)
        lr = self.options.lr * lr_scale
        if self.options.method == "mirror":
            step = -lr * g
            pi = self.pi * torch.exp(step - step.max())  # shift for stability; Z absorbs it
            pi = pi / pi.sum()
        else:
            pi = project_to_simplex(self.pi - lr * g)
        self.pi = self._apply_floor(pi)

    def state_dict(self) -> dict:
        return {"pi": self.pi.clone(), "sq_avg": self.sq_avg, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.pi = state["pi"].clone().to(torch.float64)
        # states saved before normalize: rms existed hold pi only
        self.sq_avg, self.steps = float(state.get("sq_avg", 0.0)), int(state.get("steps", 0))


@hookimpl
def scalebio_weights():
    return Simplex
