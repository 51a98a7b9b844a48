"""Helpers of the resume tests.

The module is also an observer plugin (entry point ``sigtest``): at the end of step
``$SCALEBIO_TEST_SIGNAL_AT`` it sends its own process SIGTERM (``$SCALEBIO_TEST_SIGNAL``), as a
scheduler or torchrun would, so the run's real signal handling stops it; with
``$SCALEBIO_TEST_SIGNAL_RANK`` only that rank is signalled (a signal that reached one rank). After
the checkpoint of step ``$SCALEBIO_TEST_FILL_AFTER`` it grows the file ``$SCALEBIO_TEST_FILL`` until
its file system is full but for ``$SCALEBIO_TEST_FILL_ROOM`` bytes (the disk fills up during a run).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import signal
from pathlib import Path

from scalebio import hookimpl

# what must be equal, bit for bit, at every step of a resumed run (everything but the step time)
COMPARED = ("pi", "loss_u", "loss_w", "val_loss", "train_loss_u", "train_loss_w", "grad_norm_u", "grad_norm_w",
            "delta", "count", "lr_scale", "lambda_updated", "trainable_layers")


@hookimpl
def scalebio_step_end(run, step, metrics):
    at = os.environ.get("SCALEBIO_TEST_SIGNAL_AT")
    only = os.environ.get("SCALEBIO_TEST_SIGNAL_RANK")
    if at is not None and step == int(at) and (only is None or only == os.environ.get("RANK", "0")):
        os.kill(os.getpid(), getattr(signal, os.environ.get("SCALEBIO_TEST_SIGNAL", "SIGTERM")))


@hookimpl
def scalebio_checkpoint_saved(run, step, path):
    if os.environ.get("SCALEBIO_TEST_FILL_AFTER") == str(step):
        filler = Path(os.environ["SCALEBIO_TEST_FILL"])
        with open(filler, "ab", buffering=0) as fh:  # unbuffered: nothing is left to flush
            try:
                while True:
                    fh.write(b"\0" * 4096)
            except OSError:
                pass
        os.truncate(filler, filler.stat().st_size - int(os.environ.get("SCALEBIO_TEST_FILL_ROOM", "0")))


def plugins(*requested):
    """The installed plugins plus this observer, with ``requested`` selected."""
    from scalebio.plugins import Plugins, discover

    eps = list(importlib.metadata.entry_points(group="scalebio"))
    eps.append(importlib.metadata.EntryPoint("sigtest", "resume_helpers", "scalebio"))
    return Plugins(list(requested) + ["sigtest"], infos=discover(eps))  # an observer runs when named


def records(out: Path) -> list:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def differences(a: list, b: list) -> list:
    """Where two metrics.jsonl differ: [(step, key)] over COMPARED, exact equality."""
    out = [("length", len(a), len(b))] if len(a) != len(b) else []
    for ra, rb in zip(a, b):
        out += [(ra["step"], k) for k in COMPARED if ra.get(k) != rb.get(k)]
        if ra["step"] != rb["step"]:
            out.append((ra["step"], "step"))
    return out


def signal_at(step, name="SIGTERM", rank=None):
    """Set (or with None, clear) the step at whose end the observer signals (only ``rank``, if given)."""
    os.environ.pop("SCALEBIO_TEST_SIGNAL_RANK", None)
    if step is None:
        os.environ.pop("SCALEBIO_TEST_SIGNAL_AT", None)
    else:
        os.environ.update(SCALEBIO_TEST_SIGNAL_AT=str(step), SCALEBIO_TEST_SIGNAL=name)
        if rank is not None:
            os.environ["SCALEBIO_TEST_SIGNAL_RANK"] = str(rank)


def run(out, *sets, steps, stop_after=None, plugin_names=("lisa",), signal_rank=None):
    """A tiny run in ``out``; with ``stop_after``, SIGTERM at the end of that many steps (to every
    rank, or only ``signal_rank``). Returns the stop message, or None when the run finished."""
    from helpers import tiny_request
    from scalebio.checkpointing import Preempted
    from scalebio.runner import execute, prepare

    req = tiny_request(out, *sets, plugins=list(plugin_names), steps=steps)
    req.out = str(out)
    signal_at(None if stop_after is None else stop_after - 1, rank=signal_rank)
    try:
        execute(prepare(req, plugins=plugins(*plugin_names)))
        return None
    except Preempted as exc:
        return str(exc)
    finally:
        signal_at(None)


def resume(out, *sets, steps=None, plugin_names=("lisa",)):
    from scalebio.runner import RunRequest, execute, prepare

    return execute(prepare(RunRequest(resume=str(out), sets=tuple(sets), steps=steps),
                           plugins=plugins(*plugin_names)))


def swap_model_state(out, step: int, from_step: int) -> None:
    """Perturb checkpoint ``step`` of run ``out``: its models and optimizers become those of
    checkpoint ``from_step`` (a negative control)."""
    import shutil

    ckpts = Path(out) / "checkpoints"
    for m in ("u", "w"):
        shutil.rmtree(ckpts / f"step-{step:08d}" / m)
        shutil.copytree(ckpts / f"step-{from_step:08d}" / m, ckpts / f"step-{step:08d}" / m)


def drop_accumulator(out, step: int) -> None:
    """Perturb checkpoint ``step`` of run ``out``: the solver forgets the hypergradients it has
    summed towards the next lambda update (a negative control)."""
    import torch

    from scalebio.checkpointing import COMMON

    path = Path(out) / "checkpoints" / f"step-{step:08d}" / COMMON
    common = torch.load(path, weights_only=False)
    assert common["solver"]["grad_steps"] > 0, "the checkpoint must be taken mid-accumulation"
    common["solver"] = {"grad_sum": None, "grad_steps": 0}
    torch.save(common, path)
