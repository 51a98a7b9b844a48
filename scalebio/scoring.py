"""Token-mean loss of whole sets (every source, the validation and test sets) under a built model.

The loss of a set is the sum of the cross-entropy over all its supervised tokens divided by their
number (not a mean of per-sample means), so ``exp(loss)`` is the set's perplexity. Every sample of
every set is used once, in order, through the backend's forward-only pass.

The run loop scores the test set with this; ``scalebio eval`` (:mod:`scalebio.evaluate`) opens a
run for a checkpoint and calls it. It imports neither, so neither imports the other.
"""
from __future__ import annotations

import math
import sys


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
