"""The ``scalebio`` subcommands that live in their own modules.

``scalebio/cli.py`` holds the small ones (run, plugins, models, prepare, export, eval) and builds
the parser. Each module here has ``HELP`` (one line), ``add_arguments(parser)`` and
``main(args) -> int``, and imports nothing heavy at module level, so ``scalebio --help`` stays fast.
``tools/*.py`` are thin wrappers that call the same code.
"""
from __future__ import annotations

import importlib
import sys

EXIT_USAGE, EXIT_NONFINITE = 2, 3

#: subcommand -> module of this package, in the order ``scalebio --help`` lists them.
COMMANDS = {
    "train": "train",
    "convert": "convert",
    "plan": "plan",
    "bench": "bench",
    "bench-parallel": "bench_parallel",
}


def module(command: str):
    return importlib.import_module(f"{__name__}.{COMMANDS[command]}")


def fail(msg: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def guarded(action, interrupted: str = "interrupted") -> int:
    """Run ``action``; bad input and a non-finite run become a message and an exit code, not a traceback."""
    from ..config import ConfigError
    from ..data import DataError
    from ..extras import MissingDependency
    from ..plugins import PluginError
    from ..roles import NonFiniteError

    try:
        action()
    except (ConfigError, DataError, PluginError, MissingDependency) as exc:
        return fail(str(exc))
    except NonFiniteError as exc:
        return fail(str(exc), EXIT_NONFINITE)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    return 0
