"""scalebio.testing, the conformance kit third parties run on their plugins: every built-in
passes it, and a plugin that breaks each contract is caught (the negative controls)."""
from __future__ import annotations

import importlib.metadata
import textwrap

import pytest

import scalebio.plugins
from scalebio.testing import ConformanceError, check_backend, check_layer_selection, check_solver, check_weights

BROKEN = '''
import random

import torch

from scalebio import hookimpl
from scalebio.roles import LayerSelection, MODELS, Selection, Weights
from scalebio_plugins.megatron.backend import MegatronBackend
from scalebio_plugins.minimax import Minimax
from scalebio_plugins.softmax import Softmax


class Ascent(Softmax):  # climbs the objective
    def update(self, grad_pi, lr_scale):
        super().update(-grad_pi, lr_scale)


class Aliased(Weights):  # hands out its own tensor
    def __init__(self, options, source_names):
        super().__init__(options, source_names)
        self.pi = torch.full((len(source_names),), 1.0 / len(source_names), dtype=torch.float64)

    def probs(self):
        return self.pi

    def update(self, grad_pi, lr_scale):
        pass


class GlobalRandom(LayerSelection):  # draws from global state: ranks would disagree
    def select(self, step):
        return Selection({m: frozenset(random.sample(range(self.num_layers), 2)) for m in MODELS}), True


class Stateful(LayerSelection):  # remembers what it drew: a resumed run would get another set
    def __init__(self, options, num_layers, seed):
        super().__init__(options, num_layers, seed)
        self.calls = 0

    def select(self, step):
        self.calls += 1
        layers = frozenset({self.calls % self.num_layers})
        return Selection({m: layers for m in MODELS}), True


class Normalizing(MegatronBackend):  # rescales the coefficients: pi's scale never reaches the gradient
    def forward_backward(self, model, train, source_coef, val=None, val_token_coef=0.0):
        return super().forward_backward(model, train, source_coef / source_coef.sum(), val, val_token_coef)


class NoLossU(Minimax):  # forgets a key the run loop reads
    def step(self, step, batch, val_batch):
        metrics = super().step(step, batch, val_batch)
        del metrics["loss_u"]
        return metrics


ascent = type("m", (), {"scalebio_weights": hookimpl(lambda: Ascent)})
aliased = type("m", (), {"scalebio_weights": hookimpl(lambda: Aliased)})
global_random = type("m", (), {"scalebio_layer_selection": hookimpl(lambda: GlobalRandom)})
stateful = type("m", (), {"scalebio_layer_selection": hookimpl(lambda: Stateful)})
normalizing = type("m", (), {"scalebio_backend": hookimpl(lambda: Normalizing)})
no_loss_u = type("m", (), {"scalebio_solver": hookimpl(lambda: NoLossU)})
'''


@pytest.fixture
def broken(tmp_path, monkeypatch):
    """Installs (as entry points seen by discover) one broken plugin per role."""
    (tmp_path / "broken_plugins.py").write_text(textwrap.dedent(BROKEN))
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = list(importlib.metadata.entry_points(group="scalebio"))
    eps += [importlib.metadata.EntryPoint(n, f"broken_plugins:{n}", "scalebio")
            for n in ("ascent", "aliased", "global_random", "stateful", "normalizing", "no_loss_u")]
    real = scalebio.plugins.discover
    monkeypatch.setattr(scalebio.plugins, "discover", lambda entry_points=None: real(eps))


@pytest.mark.parametrize("name", ["softmax", "simplex"])
def test_builtin_weights_conform(name):
    check_weights(name)


@pytest.mark.parametrize("name,options", [("full", None), ("lisa", None), ("lisa", {"draw": "shared", "gamma": 3})])
def test_builtin_layer_selections_conform(name, options):
    check_layer_selection(name, options)


def test_builtin_backend_conforms():
    check_backend("megatron")


def test_builtin_solver_conforms():
    check_solver("minimax")


def test_broken_weights_are_caught(broken):
    with pytest.raises(ConformanceError, match="the first source must lose weight"):
        check_weights("ascent")
    check_weights("ascent", learns=False)  # a fixed-weights plugin opts out of the direction rule
    with pytest.raises(ConformanceError, match="after the caller changed the tensor probs"):
        check_weights("aliased", learns=False)


def test_broken_layer_selection_is_caught(broken):
    for broken_name in ("global_random", "stateful"):
        with pytest.raises(ConformanceError, match="must be a pure function of the step"):
            check_layer_selection(broken_name)
    with pytest.raises(ConformanceError, match="does not take the layer selection role"):
        check_layer_selection("softmax")


@pytest.mark.slow
def test_broken_backend_and_solver_are_caught(broken):
    with pytest.raises(ConformanceError, match="doubling source_coef must double the gradient"):
        check_backend("normalizing")
    with pytest.raises(ConformanceError, match="returned no loss_u"):
        check_solver("no_loss_u")
