"""Run-setting recipes shipped with the package: ``--config NAME`` reads ``recipes/NAME.yaml``
when NAME is not a file (docs/configuration.md, "Recipes")."""
from __future__ import annotations

from pathlib import Path


def recipes_dir() -> Path:
    return Path(__file__).resolve().parent


def available() -> list:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def resolve(name: str) -> Path:
    """A config file path as given, or the shipped recipe of that name; a bare name that is neither
    is an error listing the recipes (a missing path is left for the YAML loader to report)."""
    path = Path(name)
    if path.exists() or path.suffix in (".yaml", ".yml") or "/" in name:
        return path
    recipe = recipes_dir() / f"{name}.yaml"
    if recipe.is_file():
        return recipe
    import difflib

    from ..config import ConfigError

    close = difflib.get_close_matches(name, available(), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"--config {name}: no such file, and not a shipped recipe{hint}; recipes: "
                      f"{', '.join(available())}")
