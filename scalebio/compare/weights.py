"""Source weights given to ``scalebio train``: a run's ``weights.json``, ``uniform`` or ``natural``.

A weights file must give every source of the data YAML exactly one weight, non-negative, adding up
to 1 within 1e-6 (what a run writes). Anything else is refused with every problem listed: a silently
renormalised or partly matched file is how a mixture ends up other than the one that was learned.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..config import ConfigError

TOLERANCE = 1e-6
NAMED = ("uniform", "natural")


def weight_problems(weights: dict, source_names=None) -> list:
    """Every reason ``weights`` (source name -> weight) is not a mixture of ``source_names``."""
    problems = []
    if source_names is not None:
        unknown = sorted(set(weights) - set(source_names))
        missing = [n for n in source_names if n not in weights]
        if unknown:
            problems.append(f"names sources the data does not have: {', '.join(unknown)}")
        if missing:
            problems.append(f"misses sources of the data: {', '.join(missing)}")
    bad = {k: v for k, v in weights.items() if not isinstance(v, (int, float)) or isinstance(v, bool)}
    if bad:
        problems.append("not numbers: " + ", ".join(f"{k}={v!r}" for k, v in bad.items()))
        return problems
    negative = {k: v for k, v in weights.items() if not math.isfinite(v) or v < 0}
    if negative:
        problems.append("negative or not finite: " + ", ".join(f"{k}={v}" for k, v in negative.items()))
    total = sum(weights.values())
    if not abs(total - 1.0) <= TOLERANCE:
        problems.append(f"they sum to {total:.9g}, not 1 (within {TOLERANCE:g})")
    return problems


def check_weights(weights: dict, source_names, what: str) -> None:
    """Raise a ConfigError naming ``what`` and every problem of ``weights``."""
    problems = weight_problems(weights, source_names)
    if problems:
        raise ConfigError(f"{what}: {'; '.join(problems)}. Give one non-negative weight per source "
                          f"({', '.join(source_names)}) adding up to 1, as a run's weights.json on this data")


def read_weights_file(path) -> dict:
    """A weights.json (or a run directory holding one) as a dict; not yet checked."""
    path = Path(path)
    if path.is_dir():
        path = path / "weights.json"
    try:
        weights = json.loads(path.read_text())
    except OSError as exc:
        named = str(path).lower() in ("uniform", "natural")  # Uniform: the names are lowercase
        hint = f" (did you mean '{str(path).lower()}'?)" if named else ""
        raise ConfigError(f"--weights {path}: cannot read it ({exc.strerror}){hint}; give a run's weights.json, "
                          f"'uniform' or 'natural'") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--weights {path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(weights, dict):
        raise ConfigError(f"--weights {path}: expected an object of source name -> weight, as a run's weights.json")
    return weights


def resolve_weights(spec: str, source_names: list, sizes=None) -> dict:
    """``spec`` (a weights file, a run directory, ``uniform`` or ``natural``) as checked weights.

    ``sizes`` is called for ``natural`` only and returns samples per source.
    """
    names = list(source_names)
    if spec == "uniform":
        return {n: 1.0 / len(names) for n in names}
    if spec == "natural":
        counts = sizes()
        total = sum(counts[n] for n in names)
        return {n: counts[n] / total for n in names}
    weights = read_weights_file(spec)
    check_weights(weights, names, f"--weights {spec}")
    return {n: float(weights[n]) for n in names}
