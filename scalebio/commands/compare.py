"""``scalebio compare``: learn weights, fine-tune on them, on uniform and natural weights and on each
baseline over several seeds, and tabulate the test loss (``tools/compare.py`` is the same command).

    scalebio compare --data DATA.yaml [--model NAME] [--load CKPT] [--plugins lisa] [--steps N]
                     [--train-steps M] [--seeds 3] [--baselines doremi] [--out DIR]

Every run is its own process (``--launcher 'torchrun --nproc-per-node 4'`` for a parallel layout)
and is checked before the first starts. The data needs a test set. Writes compare.json,
compare.png, one run directory per run and logs/; docs/quickstart.md has an example.
"""
from __future__ import annotations

import argparse

from . import fail, guarded

HELP = "learn weights, then fine-tune on them and on uniform, natural and baseline weights: a test-loss table"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", required=True, metavar="DATA.yaml", help="sources, validation and test set")
    ap.add_argument("--model", default=None, metavar="NAME", help="model config (default: tiny, or the checkpoint's)")
    ap.add_argument("--load", default=None, metavar="CKPT_DIR", help="every run starts from this checkpoint")
    ap.add_argument("--plugins", default="", metavar="A,B",
                    help="plugins of every run (e.g. lisa); one of a role an arm fills itself (solver, weights) "
                         "applies to the bilevel run only")
    ap.add_argument("--steps", type=int, default=None, help="steps of the bilevel and baseline runs")
    ap.add_argument("--train-steps", type=int, default=None, help="steps of every train run (default: --steps)")
    ap.add_argument("--seeds", type=int, default=3, help="train runs per arm, seeds --seed, --seed+1, ... (default 3)")
    ap.add_argument("--seed", type=int, default=1234,
                    help="seed of the weight-learning runs and the first train seed (default 1234)")
    ap.add_argument("--baselines", default="doremi", metavar="A,B",
                    help="weight-learning solver plugins to train on as well (default doremi; '' for none)")
    ap.add_argument("--out", default="runs/compare-{time}", help="compare directory (default runs/compare-{time})")
    ap.add_argument("--config", action="append", default=[], metavar="RUN.yaml", help="settings of every run")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a setting of every run; repeatable")
    ap.add_argument("--learn-set", dest="learn_sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a setting of the bilevel and baseline runs only")
    ap.add_argument("--train-set", dest="train_sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a setting of the train runs only")
    ap.add_argument("--launcher", default="", metavar="CMD",
                    help="how each run starts, e.g. 'torchrun --nproc-per-node 4' (default: this Python)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing compare directory")


def main(args) -> int:
    from ..cli import names
    from ..compare.run import CompareError, CompareRequest, compare

    req = CompareRequest(data=args.data, model=args.model, load=args.load, plugins=names(args.plugins),
                         steps=args.steps, train_steps=args.train_steps, seeds=args.seeds, seed=args.seed,
                         baselines=names(args.baselines), out=args.out, configs=tuple(args.config),
                         sets=tuple(args.sets), learn_sets=tuple(args.learn_sets), train_sets=tuple(args.train_sets),
                         launcher=args.launcher, overwrite=args.overwrite)
    try:
        return guarded(lambda: compare(req))
    except CompareError as exc:
        return fail(str(exc), 1)
