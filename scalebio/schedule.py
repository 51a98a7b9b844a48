"""The learning-rate schedule shared by lr_u, lr_w and lr_lambda (SPEC §2)."""
from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, warmup: float, kind: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``.

    Linear warmup over the first ``warmup`` fraction of the steps (at least one step when the
    fraction is non-zero), then ``cosine`` or ``linear`` decay to ``min_ratio``, or ``constant``.
    """
    warmup_steps = math.ceil(warmup * total_steps) if warmup > 0 else 0
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif kind == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    return min_ratio + (1.0 - min_ratio) * decay
