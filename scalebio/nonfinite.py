"""What the run loop does at a non-finite step (``run.on_nonfinite``, docs/configuration.md).

A solver raises :class:`~scalebio.roles.NonFiniteError` before it changes any state, so skipping
a step needs nothing undone: the loop only counts skips in a row and decides when to stop.
"""
from __future__ import annotations

from .roles import NonFiniteError


def trailing_skips(records: list) -> int:
    """Skipped steps at the end of ``records`` (metrics.jsonl rows): a resumed run goes on counting."""
    n = 0
    for r in reversed(records):
        if "skipped" not in r:
            break
        n += 1
    return n


def count_skip(run, exc: NonFiniteError, step: int, skips: int) -> int:
    """A non-finite step after ``skips`` skipped ones in a row: the new count, or the error that
    stops the run (``run.on_nonfinite: stop``, or one past ``run.max_skips`` in a row). Every rank
    decides alike: the checked values are global."""
    if run.on_nonfinite == "stop":
        raise exc
    if skips >= run.max_skips:
        raise NonFiniteError(f"{exc}. The {skips} steps before it were skipped as well (run.max_skips="
                             f"{run.max_skips}): the run stops", exc.step, exc.model, exc.quantity) from exc
    return skips + 1
