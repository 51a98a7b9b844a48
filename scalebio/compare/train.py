"""``scalebio train``: fine-tune one model on a mixture through the same runner, roles and backend as
a bilevel run: the ``train`` solver with ``fixed`` weights, rows drawn by the weights
(``data.sampling: weighted``).

``--weights`` is a run's ``weights.json`` (or its run directory), ``uniform``, or ``natural``
(proportional to each source's samples after tokenization). It is checked against the data's
sources before anything heavy starts, and the resolved numbers go into the run's ``config.yaml``
as ``fixed.weights``.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace

from ..runner import RunRequest, execute, prepare
from .weights import resolve_weights

TRAIN_PLUGINS = ("train", "fixed")


def natural_sizes(cfg) -> dict:
    """Samples per source after tokenization (from the cache when a run has built it)."""
    from ..data import RunData
    from ..tokenizer import load_tokenizer

    return RunData(cfg.data, load_tokenizer(cfg.data.tokenizer), cfg.run.seed).source_sizes()


def train_request(req: RunRequest, weights: str, plugins=None) -> tuple:
    """(Prepared, weights by source) of a train run; ``req`` as for ``scalebio run``."""
    base = replace(req, plugins=TRAIN_PLUGINS + tuple(req.plugins), sets=("data.sampling=weighted",) + tuple(req.sets))
    first = prepare(base, plugins=plugins)
    names = sorted(first.config.data.sources)
    pi = resolve_weights(weights, names, sizes=lambda: natural_sizes(first.config))
    # JSON is YAML: any source name survives the --set parser
    final = replace(base, sets=base.sets + (f"fixed.weights={json.dumps(pi)}",))
    return prepare(final, plugins=first.plugins), pi


def train(req: RunRequest, weights: str) -> dict:
    prepared, pi = train_request(req, weights)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"train: one model fine-tuned on the mixture '{weights}' (rows drawn by these weights): "
              + ", ".join(f"{n} {p:.4f}" for n, p in pi.items()))
    return execute(prepared, overwrite=req.overwrite)
