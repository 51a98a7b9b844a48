"""``scalebio eval`` / ``tools/evaluate.py``: the token-mean loss of a checkpoint on every source
and on the validation set, printed as JSON.

The numbers come from :func:`scalebio.scoring.evaluate_sets` (token-mean cross-entropy over every
supervised token of a set; ``exp(loss)`` is its perplexity), through the same backend, layout and
data pipeline as a run (any TP/PP under torchrun), so they are comparable with ``transformers``
on the converted model.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from .outputs import atomic_write, check_output_path
from .scoring import evaluate_sets

__all__ = ["evaluate", "evaluate_sets", "add_arguments", "main", "eval_main"]

HELP = "token-mean loss of a checkpoint per source and on validation, as JSON"


def evaluate(req) -> dict:
    """Open a run for ``req`` (a RunRequest with ``load``), evaluate, close it."""
    from .runner import open_run, prepare

    with tempfile.TemporaryDirectory(prefix="scalebio-eval-") as tmp:
        req.out = str(Path(tmp) / "run")  # open_run wants a run directory; evaluation writes nothing there
        prepared = prepare(req)
        cfg = prepared.config
        with open_run(prepared, verbose=False, models=("w",)) as (ctx, data):  # one copy is enough
            sets = evaluate_sets(ctx, data, progress=cfg.run.progress)
            layout = getattr(ctx.backend, "layout", None)
    result = {"checkpoint": cfg.run.load, "model": cfg.model.name,
              "sources": {k: v for k, v in sets.items() if k not in ("validation", "test")},
              "validation": sets["validation"]}
    if "test" in sets:
        result["test"] = sets["test"]
    if layout is not None:
        result["layout"] = {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp}
    return result


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--load", required=True, metavar="CKPT_DIR",
                    help="a scalebio checkpoint (scalebio convert hf-to-megatron, or a run's final/w)")
    ap.add_argument("--data", required=True, metavar="DATA.yaml",
                    help="sources and validation set (the tokenizer defaults to the checkpoint's)")
    ap.add_argument("--model", default=None, metavar="NAME", help="model config (default: the checkpoint's)")
    ap.add_argument("--config", action="append", default=[], metavar="RUN.yaml")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="e.g. --set megatron.tp=2 --set run.global_batch=16")
    ap.add_argument("--output", default=None, metavar="FILE.json", help="also write the JSON here")


def main(args) -> int:
    from .commands import guarded
    from .runner import RunRequest

    req = RunRequest(model=args.model, data=args.data, configs=tuple(args.config),
                     sets=("run.save_final=false",) + tuple(args.sets), load=args.load)

    def action():
        main = int(os.environ.get("RANK", "0")) == 0
        if args.output and main:  # before any data is read or model built
            _check_output(Path(args.output), args)
        result = evaluate(req)
        if main:
            text = json.dumps(result, indent=2)
            print(text)
            if args.output:
                atomic_write(Path(args.output), text + "\n")

    return guarded(action)


def _check_output(out: Path, args) -> None:
    """--output: writable, and not one of the inputs (the data YAML, a config, the checkpoint)."""
    from .config import ConfigError

    check_output_path(out, "--output")
    for given in [args.data, *args.config] + ([args.model] if args.model else []):
        if Path(given).exists() and out.resolve() == Path(given).resolve():
            raise ConfigError(f"--output {out} is an input of the evaluation ({given}); give another file")
    if out.resolve().is_relative_to(Path(args.load).resolve()):
        raise ConfigError(f"--output {out} lies inside the checkpoint {args.load}; give a file elsewhere")


def eval_main(argv=None, prog: str = "scalebio eval") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=HELP[0].upper() + HELP[1:] + ".")
    add_arguments(ap)
    return main(ap.parse_args(argv))
