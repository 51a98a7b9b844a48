"""Hook specifications: the whole contract between the core and its plugins.

A plugin takes a *role* by implementing that role's hook, which returns the class that plays
it (a subclass of the matching base in :mod:`scalebio.roles`). One plugin is selected per role
for a run (``--plugins a,b``; defaults otherwise), and only the selected one is asked.

*Observer* hooks are called on every plugin of the run: the selected role plugins and the
observers named in ``--plugins`` (a plugin without a role, such as ``tensorboard``), so a third
party can add a logger or an uploader without taking a role.

docs/plugins.md documents every hook here; tests/test_docs.py fails when one is missing.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("scalebio")

# --------------------------------------------------------------------------- roles


@hookspec(firstresult=True)
def scalebio_solver():
    """Role *solver*: return a :class:`scalebio.roles.Solver` subclass.

    The solver owns one bilevel step: which passes run on which model with which loss
    coefficients, the optimizer steps, and the hypergradient handed to the weights.
    """


@hookspec(firstresult=True)
def scalebio_layer_selection():
    """Role *layer selection*: return a :class:`scalebio.roles.LayerSelection` subclass.

    It decides which decoder layers of u and w are trainable at each step and whether
    optimizer state survives a switch.
    """


@hookspec(firstresult=True)
def scalebio_weights():
    """Role *weights*: return a :class:`scalebio.roles.Weights` subclass.

    It owns the parameterisation of the source weights pi and their update from the
    gradient of the objective with respect to pi.
    """


@hookspec(firstresult=True)
def scalebio_backend():
    """Role *backend*: return a :class:`scalebio.roles.Backend` subclass.

    It builds the two models u and w from a model config, owns the parallel layout,
    forward/backward, optimizers and model checkpoints.
    """


# --------------------------------------------------------------------------- observers


@hookspec
def scalebio_run_start(run, config: dict):
    """Observer: called on every rank once the models are built and ``config.yaml`` is written,
    before the first step. ``config`` is the resolved configuration, as in ``config.yaml``
    (with its ``metadata``)."""


@hookspec
def scalebio_step_end(run, step: int, metrics: dict):
    """Observer: called on every rank after each step with that step's metrics.

    ``run`` is the :class:`scalebio.roles.RunContext`; ``run.is_main`` tells the rank that
    writes outputs. ``metrics`` is the record also appended to ``metrics.jsonl``.
    """


@hookspec
def scalebio_checkpoint_saved(run, step: int, path: str):
    """Observer: called after a checkpoint directory is complete on disk (atomically renamed)."""


@hookspec
def scalebio_run_end(run, result: dict):
    """Observer: called once when the run finishes.

    ``result`` holds ``weights`` (final pi by source name), ``steps`` and ``out_dir``.
    """
