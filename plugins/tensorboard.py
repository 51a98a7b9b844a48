"""Observer plugin ``tensorboard``: TensorBoard event files of a run, under ``RUN_DIR/tensorboard/``.

Off unless named: ``scalebio run --plugins tensorboard`` (install with ``pip install
'scalebio[tensorboard]'``), then ``tensorboard --logdir RUN_DIR/tensorboard``. Every number of a
step's ``metrics.jsonl`` record becomes a scalar at that step, named as in the record with ``/``
for nesting (:func:`scalebio.outputs.scalars`): ``pi/<source>``, ``loss_u/<source>``,
``loss_w/<source>``, ``val_loss``, ``lr_u``, ``lr_w``, ``grad_norm_u``, ``grad_norm_w``,
``tokens_per_s``, ``time_s``, ``peak_memory_bytes/rank<i>`` and the rest. The final pi is logged at
step ``run.steps`` (as in ``pi.csv``), with the resolved configuration and the weights table as
text. Only the main rank writes; events are flushed every step, so a killed run keeps its curves.
"""
from __future__ import annotations

import yaml

from scalebio import hookimpl
from scalebio.extras import require
from scalebio.outputs import scalars, weights_table

require("tensorboard", "tensorboard")  # cheap: listed as not available without the extra

_KEY = "tensorboard"  # this plugin's slot in run.extra


@hookimpl
def scalebio_run_start(run, config):
    if not run.is_main:
        return
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(run.out_dir / "tensorboard"))
    writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)
    run.extra[_KEY] = writer


@hookimpl
def scalebio_step_end(run, step, metrics):
    writer = run.extra.get(_KEY)
    if writer is None:
        return
    for tag, value in scalars(metrics).items():
        writer.add_scalar(tag, value, step)
    writer.flush()


@hookimpl
def scalebio_run_end(run, result):
    writer = run.extra.pop(_KEY, None)
    if writer is None:
        return
    steps = result["steps"]
    for name, pi in result["weights"].items():
        writer.add_scalar(f"pi/{name}", pi, steps)
    names = list(result["weights"])
    table = weights_table(names, [result["initial"][n] for n in names], [result["weights"][n] for n in names],
                          result.get("last"))
    writer.add_text("weights", "```\n" + table + "\n```", steps)
    writer.close()
