"""Layer-selection plugin ``lisa``: Layerwise Importance Sampled AdamW (arXiv 2403.17919).

Every ``interval`` steps, starting at step 0, ``gamma`` decoder layers are drawn uniformly
without replacement; only they train until the next draw (embeddings, final norm and output
layer always train; the backend enforces that). The draw is seeded by (run seed, step, model),
so it is identical on every rank. u and w share one draw (``draw: shared``, the default) or draw
independently (``independent``, as the authors' code). The default is measured (docs/results.md):
with independent draws Delta = loss(w) - loss(u) also measures what each copy's layers can learn,
which ranked corrupted sources first from random init and on SmolLM2-135M at the authors' settings.

At a switch, ``optimizer_state: reset`` (default, as the paper's runs effectively did) starts
every body layer's AdamW moments afresh; ``keep`` lets a layer that stays selected keep its
moments. A frozen layer never holds optimizer state, in either mode.

Spellings from other projects are accepted: ``lisa_activated_layers`` / ``lisa_n_layers`` for
gamma, ``lisa_interval_steps`` / ``lisa_step_interval`` for interval.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from scalebio import hookimpl
from scalebio.config import ConfigError
from scalebio.roles import MODELS, LayerSelection, Selection

_LISA_STREAM = 0x4C495341  # keeps LISA draws independent of the data sampler's streams


@dataclass
class LisaOptions:
    gamma: int = field(default=2, metadata={"aliases": ["lisa_activated_layers", "lisa_n_layers"]})
    interval: int = field(default=20, metadata={"aliases": ["lisa_interval_steps", "lisa_step_interval"]})
    draw: Literal["independent", "shared"] = "shared"  # measured default (module doc); the SPEC's is independent
    optimizer_state: Literal["reset", "keep"] = "reset"

    def validate(self):
        if self.gamma < 0:
            raise ConfigError(f"lisa.gamma must be >= 0, got {self.gamma}")
        if self.interval < 1:
            raise ConfigError(f"lisa.interval must be >= 1, got {self.interval}")


class Lisa(LayerSelection):
    Options = LisaOptions

    def __init__(self, options: LisaOptions, num_layers: int, seed: int):
        super().__init__(options, num_layers, seed)
        if options.gamma > num_layers:
            raise ConfigError(f"lisa.gamma={options.gamma} exceeds the model's {num_layers} decoder layers")

    def draw(self, step: int, model_index: int) -> frozenset:
        rng = np.random.default_rng([self.seed, _LISA_STREAM, step, model_index])
        return frozenset(int(i) for i in rng.choice(self.num_layers, size=self.options.gamma, replace=False))

    def select(self, step: int):
        drawn_at = step - step % self.options.interval  # the last draw, at or before ``step``
        shared = self.options.draw == "shared"
        layers = {m: self.draw(drawn_at, 0 if shared else i + 1) for i, m in enumerate(MODELS)}
        return Selection(layers, keep_state=self.options.optimizer_state == "keep"), drawn_at == step


@hookimpl
def scalebio_layer_selection():
    return Lisa
