"""Observer plugin ``wandb``: a Weights & Biases run for each scalebio run.

Off unless named: ``scalebio run --plugins wandb`` (install with ``pip install 'scalebio[wandb]'``).
W&B is set up the way its users already do it, with its own environment variables:
``WANDB_PROJECT`` (default ``scalebio``), ``WANDB_ENTITY``, ``WANDB_NAME`` (default: the run
directory's name), ``WANDB_MODE=offline`` (no account, no network; ``wandb sync`` uploads later),
``WANDB_DIR`` (default: the run directory, so the W&B files sit next to ``metrics.jsonl``).

The W&B config is the resolved configuration (``config.yaml``, with its ``metadata``). Each step
logs every number of the step's ``metrics.jsonl`` record (:func:`scalebio.outputs.scalars`: pi,
per-source losses of u and w, validation loss, learning rates, grad norms, tokens per second, step
time, peak memory per rank). At the end: a ``weights`` table (source, initial and final pi, last
losses of u and w), the final pi in the summary as ``final_pi/<source>``, and the test loss when
there is a test set. Only the main rank talks to W&B.
"""
from __future__ import annotations

import os

from scalebio import hookimpl
from scalebio.extras import require
from scalebio.outputs import scalars

require("wandb", "wandb")  # cheap: listed as not available without the extra

_KEY = "wandb"  # this plugin's slot in run.extra


@hookimpl
def scalebio_run_start(run, config):
    if not run.is_main:
        return
    import wandb

    run.extra[_KEY] = wandb.init(project=os.environ.get("WANDB_PROJECT", "scalebio"),
                                 name=os.environ.get("WANDB_NAME", run.out_dir.name),
                                 dir=os.environ.get("WANDB_DIR", str(run.out_dir)), config=config)


@hookimpl
def scalebio_step_end(run, step, metrics):
    wb = run.extra.get(_KEY)
    if wb is not None:
        wb.log(scalars(metrics), step=step)


@hookimpl
def scalebio_run_end(run, result):
    wb = run.extra.pop(_KEY, None)
    if wb is None:
        return
    import wandb

    last = result.get("last") or {}
    rows = [[name, result["initial"][name], pi, (last.get("loss_u") or {}).get(name),
             (last.get("loss_w") or {}).get(name)] for name, pi in result["weights"].items()]
    table = wandb.Table(columns=["source", "initial_pi", "final_pi", "loss_u", "loss_w"], data=rows)
    wb.log({"weights": table}, step=result["steps"])
    wb.summary.update({f"final_pi/{name}": pi for name, pi in result["weights"].items()})
    if result.get("test"):
        wb.summary.update({"test_loss": result["test"]["loss"], "test_perplexity": result["test"]["perplexity"]})
    wb.finish()
