"""``scalebio train``: fine-tune one model on a mixture (``tools/train.py`` is the same command).

    scalebio train --data DATA.yaml --weights RUN_DIR/weights.json|uniform|natural [--load CKPT]
                   [--model NAME] [--plugins lisa] [--steps N] [--out DIR] [--seed S] [--set ...]

The same runner, backend (every layout, bf16, LISA or full), data formats, cache and config rules
as ``scalebio run``, with the ``train`` solver and ``fixed`` weights: rows are drawn with the
weights as sampling probabilities. It writes config.yaml, metrics.jsonl, test.json (with a test
set), eval.json (per-source, validation and test loss of the final model) and, with
``--set run.save_final=true``, the final model under final/w.
"""
from __future__ import annotations

import argparse

from . import guarded

HELP = "fine-tune one model on a mixture (a run's weights.json, uniform or natural)"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    from ..cli import add_run_arguments

    ap.add_argument("--weights", required=True, metavar="RUN_DIR/weights.json|uniform|natural",
                    help="the mixture: a run's weights.json (or its directory), uniform, or natural (proportional "
                         "to the samples of each source)")
    add_run_arguments(ap)


def main(args) -> int:
    from ..cli import cmd_plugins, run_request
    from ..compare.train import train

    if args.list_plugins:
        return cmd_plugins()
    return guarded(lambda: train(run_request(args), args.weights))
