"""Optional dependencies (the extras of pyproject.toml): a clear message instead of an ImportError.

``require("wandb", "wandb")`` is cheap (it only looks the module up), so a plugin module can call
it at import: the plugin manager then lists the plugin as needing its extra, stays quiet while it
is not selected, and names the install command when it is.
"""
from __future__ import annotations

import importlib
import importlib.util


class MissingDependency(ImportError):
    """An optional package is not installed; the message says which extra installs it."""


def _message(module: str, extra: str, purpose: str) -> str:
    what = f"{purpose} needs" if purpose else "needs"
    return f"{what} the '{module}' package, which is not installed: pip install 'scalebio[{extra}]'"


def require(module: str, extra: str, purpose: str = "") -> None:
    """Raise :class:`MissingDependency` unless ``module`` can be imported (without importing it)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingDependency(_message(module, extra, purpose))


def optional_import(module: str, extra: str, purpose: str = ""):
    """Import and return ``module``, or raise :class:`MissingDependency` naming the extra.

    Only a missing ``module`` itself is reported this way; an installed package that fails to
    import (a broken dependency of its own) raises its own error."""
    require(module, extra, purpose)
    return importlib.import_module(module)
