"""``scalebio eval`` / ``tools/evaluate.py``: the token-mean loss of a checkpoint on every source
and on the validation set, printed as JSON.

The loss of a set is the sum of the cross-entropy over all its supervised tokens divided by their
number (not a mean of per-sample means), so ``exp(loss)`` is the set's perplexity. Every sample of
every set is used once, through the same backend, layout and data pipeline as a run (any TP/PP
under torchrun), so the numbers are comparable with ``transformers`` on the converted model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from .outputs import atomic_write


def evaluate_sets(ctx, data, model: str = "w", progress: bool = False, sets=None) -> dict:
    """{set name: {"loss", "perplexity", "tokens", "samples"}}, by default for every source and
    "validation" (and "test" when the data has one)."""
    if sets is None:
        sets = [(t.name, t) for t in data.train] + [("validation", data.val)]
        if data.test is not None:
            sets.append(("test", data.test))
    n = ctx.config.run.global_batch  # the layout check guarantees it splits into micro-batches on every rank
    bar = None
    if progress and ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(t.samples) for _, t in sets), desc="eval", unit="sample", file=sys.stderr)
    out = {}
    for name, tset in sets:
        loss_sum, tokens = 0.0, 0.0
        for batch in data.ordered_batches(tset, n):
            result = ctx.backend.evaluate(model, batch)
            loss_sum += result.val_loss_sum
            tokens += result.val_tokens
            if bar is not None:
                bar.update(int((batch.loss_mask.sum(1) > 0).sum()))
        loss = loss_sum / tokens if tokens else None
        out[name] = {"loss": loss, "perplexity": math.exp(loss) if loss is not None else None,
                     "tokens": int(tokens), "samples": len(tset.samples)}
    if bar is not None:
        bar.close()
    return out


def evaluate(req) -> dict:
    """Open a run for ``req`` (a RunRequest with ``load``), evaluate, close it."""
    from .runner import open_run, prepare

    with tempfile.TemporaryDirectory(prefix="scalebio-eval-") as tmp:
        req.out = str(Path(tmp) / "run")  # open_run wants a run directory; evaluation writes nothing there
        prepared = prepare(req)
        cfg = prepared.config
        with open_run(prepared, verbose=False, models=("w",)) as (ctx, data):  # one copy is enough
            sets = evaluate_sets(ctx, data, progress=cfg.run.progress)
            layout = ctx.backend.layout if hasattr(ctx.backend, "layout") else None
    result = {"checkpoint": cfg.run.load, "model": cfg.model.name,
              "sources": {k: v for k, v in sets.items() if k not in ("validation", "test")},
              "validation": sets["validation"]}
    if "test" in sets:
        result["test"] = sets["test"]
    if layout is not None:
        result["layout"] = {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp}
    return result


def eval_main(argv=None, prog: str = "scalebio eval") -> int:
    from .config import ConfigError
    from .data import DataError
    from .plugins import PluginError
    from .runner import RunRequest

    ap = argparse.ArgumentParser(prog=prog, description="Token-mean loss of a checkpoint per source and on "
                                                        "validation, as JSON.")
    ap.add_argument("--load", required=True, metavar="CKPT_DIR", help="a scalebio checkpoint (tools/convert.py)")
    ap.add_argument("--data", required=True, metavar="DATA.yaml",
                    help="sources and validation set (the tokenizer defaults to the checkpoint's)")
    ap.add_argument("--model", default=None, metavar="NAME", help="model config (default: the checkpoint's)")
    ap.add_argument("--config", action="append", default=[], metavar="RUN.yaml")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="e.g. --set megatron.tp=2 --set run.global_batch=16")
    ap.add_argument("--output", default=None, metavar="FILE.json", help="also write the JSON here")
    args = ap.parse_args(argv)
    req = RunRequest(model=args.model, data=args.data, configs=tuple(args.config),
                     sets=("run.save_final=false",) + tuple(args.sets), load=args.load)
    main = int(os.environ.get("RANK", "0")) == 0
    try:
        if args.output and main:  # before any data is read or model built
            _check_output(Path(args.output), args)
        result = evaluate(req)
        if main:
            text = json.dumps(result, indent=2)
            print(text)
            if args.output:
                atomic_write(Path(args.output), text + "\n")
    except (ConfigError, DataError, PluginError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _check_output(out: Path, args) -> None:
    """--output: writable, and not one of the inputs (the data YAML, a config, the checkpoint)."""
    from .config import ConfigError
    from .outputs import check_output_path

    check_output_path(out, "--output")
    for given in [args.data, *args.config] + ([args.model] if args.model else []):
        if Path(given).exists() and out.resolve() == Path(given).resolve():
            raise ConfigError(f"--output {out} is an input of the evaluation ({given}); give another file")
    if out.resolve().is_relative_to(Path(args.load).resolve()):
        raise ConfigError(f"--output {out} lies inside the checkpoint {args.load}; give a file elsewhere")
