"""Run-setting recipes shipped with the package: ``--config NAME`` reads ``recipes/NAME.yaml``
when NAME is not a file (docs/configuration.md, "Recipes")."""
from __future__ import annotations

from pathlib import Path


def recipes_dir() -> Path:
    return Path(__file__).resolve().parent


def available() -> list:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def resolve(name: str) -> Path:
    """A config file path as given, or the shipped recipe of that name (a missing file is left for
    the YAML loader to report)."""
    path = Path(name)
    if path.exists() or path.suffix in (".yaml", ".yml") or "/" in name:
        return path
    recipe = recipes_dir() / f"{name}.yaml"
    return recipe if recipe.is_file() else path
