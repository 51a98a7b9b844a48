"""Command line: ``scalebio run|eval|plugins|models`` (``tools/run.py`` is ``scalebio run``,
``tools/evaluate.py`` is ``scalebio eval``)."""
from __future__ import annotations

import argparse
import sys

EXIT_USAGE, EXIT_NONFINITE = 2, 3


def add_run_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--plugins", default="", metavar="A,B",
                    help="plugins to use, comma-separated (one per role; defaults: minimax, full, softmax, megatron)")
    ap.add_argument("--model", default=None, metavar="NAME",
                    help="a model in model_configs/ (see `scalebio models`) or a model YAML file (default: tiny)")
    ap.add_argument("--data", default=None, metavar="DATA.yaml",
                    help="sources, validation set and tokenizer; without it the embedded demo runs")
    ap.add_argument("--config", action="append", default=[], metavar="RUN.yaml",
                    help="run settings (sections run, optim, and plugin sections); repeatable")
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
    ap.add_argument("--list-plugins", action="store_true", help="list installed plugins and exit")


def _fail(msg: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def cmd_plugins() -> int:
    from .plugins import discover, format_table

    print(format_table(discover()))
    return 0


def cmd_models() -> int:
    from .config import available_models, model_configs_dir

    print(f"model configs in {model_configs_dir()}:")
    for name in available_models():
        print(f"  {name}")
    return 0


def cmd_run(args) -> int:
    if args.list_plugins:
        return cmd_plugins()
    from .config import ConfigError
    from .data import DataError
    from .plugins import PluginError
    from .roles import NonFiniteError
    from .runner import RunRequest, run

    req = RunRequest(model=args.model, data=args.data, configs=tuple(args.config), sets=tuple(args.sets),
                     plugins=tuple(p.strip() for p in args.plugins.split(",") if p.strip()),
                     steps=args.steps, out=args.out, seed=args.seed, overwrite=args.overwrite,
                     tp=args.tp, pp=args.pp, vpp=args.vpp, load=args.load)
    try:
        run(req)
    except (ConfigError, DataError, PluginError) as exc:
        return _fail(str(exc))
    except NonFiniteError as exc:
        return _fail(str(exc), EXIT_NONFINITE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def run_main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/run.py", description="Run ScaleBiO data reweighting.")
    add_run_arguments(ap)
    return cmd_run(ap.parse_args(argv))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scalebio", description="ScaleBiO data reweighting for LLM fine-tuning.")
    sub = ap.add_subparsers(dest="command", required=True)
    add_run_arguments(sub.add_parser("run", help="run the bilevel reweighting (the embedded demo by default)"))
    sub.add_parser("plugins", help="list installed plugins with role, version and hooks")
    sub.add_parser("models", help="list the model configs")
    sub.add_parser("eval", help="token-mean loss of a checkpoint per source and on validation, as JSON",
                   add_help=False)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:  # its own parser: see scalebio/evaluate.py
        from .evaluate import eval_main

        return eval_main(argv[1:])
    args = ap.parse_args(argv)
    if args.command == "plugins":
        return cmd_plugins()
    if args.command == "models":
        return cmd_models()
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
