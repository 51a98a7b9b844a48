"""Solver plugin ``train``: standard fine-tuning of one model (w) on a mixture (``scalebio train``).

The rows of each batch are drawn with pi as sampling probabilities (``data.sampling: weighted``,
which ``scalebio train`` sets), so the loss is the plain mean of the per-sample losses of the
batch: in expectation sum_k pi_k * l_k(w), the objective the bilevel solver's u trains on, with pi
moved from the loss coefficients into the sampling. One forward-backward and one optimizer step
per step, on the same backend, layouts, precision and layer selection as the bilevel run; pi comes
from the weights plugin (``fixed``) and is never updated.

At the end it writes ``eval.json``: the token-mean loss of the final w on the first
``eval_samples`` samples of every source and of the validation set, and on the whole test set
(also in ``test.json``, which the run writes for every solver).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional

import torch

from scalebio import hookimpl
from scalebio.config import ConfigError
from scalebio.roles import Solver, check_finite
from scalebio.schedule import lr_factor


@dataclass
class TrainOptions:
    val_every: int = 10  # validation loss of w every N steps and at the last (forward only); 0 = never
    eval_samples: Optional[int] = 64  # eval.json: first N samples of each source and of validation; null = all

    def validate(self):
        if self.val_every < 0:
            raise ConfigError(f"train.val_every must be >= 0, got {self.val_every}")
        if self.eval_samples is not None and self.eval_samples < 0:
            raise ConfigError(f"train.eval_samples must be >= 0 or null, got {self.eval_samples}")


class _Head:
    """The first ``n`` samples of a tokenized set, read the way evaluation reads a set."""

    def __init__(self, tset, n: Optional[int]):
        self.tset = tset
        self.samples = range(len(tset.samples) if n is None else min(n, len(tset.samples)))

    def sample(self, i: int):
        return self.tset.sample(i)


def val_due(step: int, steps: int, every: int) -> bool:
    return every > 0 and (step % every == 0 or step == steps - 1)


class Train(Solver):
    Options = TrainOptions
    models = ("w",)
    needs_validation = False
    sampling = ("weighted",)

    def __init__(self, options: TrainOptions, run):
        super().__init__(options, run)
        self.samples_seen = 0
        self.tokens_seen = 0
        data = run.config.data
        if run.is_main and (data.validation is None or data.test is None):
            missing = [what for what, cfg in (("validation", data.validation), ("test", data.test)) if cfg is None]
            print(f"note: the data has no {' and no '.join(missing)} set, so this run will not report "
                  + " or ".join({"validation": "validation loss (val_loss is NaN in metrics.jsonl)",
                                 "test": "test loss (no test.json)"}[m] for m in missing))

    def step(self, step: int, batch, val_batch) -> dict:
        run = self.run
        backend, cfg, opt = run.backend, run.config, run.config.optim
        names = run.source_names
        counts = batch.source_counts(len(names))
        n = float(counts.sum())
        scale = lr_factor(step, cfg.run.steps, opt.warmup, opt.schedule, opt.min_lr_ratio)
        # rows already follow pi: every sample weighs 1/n, whatever its source
        res = backend.forward_backward("w", batch, torch.full((len(names),), 1.0 / n, dtype=torch.float64))
        train_loss = float(res.loss_sum.sum()) / n
        # checked before the update: a NonFiniteError leaves w and its optimizer as they were
        check_finite(step, "w", {"training loss": train_loss, "gradient norm": backend.grad_norm("w")})
        lr = opt.lr_w_value * scale
        stepped = backend.optimizer_step("w", lr, opt.clip_grad)
        val_loss = float("nan")
        if val_batch is not None and val_due(step, cfg.run.steps, self.options.val_every):
            val_loss = backend.evaluate("w", val_batch).val_loss
        tokens = batch.supervised_tokens()
        self.samples_seen += int(n)
        self.tokens_seen += tokens
        mean = res.mean()
        return {
            "loss_w": {name: _num(mean[i]) for i, name in enumerate(names)},
            "count": {name: int(counts[i]) for i, name in enumerate(names)},
            "val_loss": val_loss,
            "train_loss_w": train_loss,
            "lr_w": lr,
            "lr_scale": scale,
            "grad_norm_w": stepped["grad_norm"],
            "samples": int(n),
            "supervised_tokens": tokens,
        }

    def evaluate_final(self, test: Optional[dict]) -> dict:
        """eval.json: the final w on every source and the validation set (first samples), and the test set."""
        from scalebio.evaluate import evaluate_sets

        run, data = self.run, self.run.data
        sets = [(t.name, _Head(t, self.options.eval_samples)) for t in data.train]
        if data.val is not None:
            sets.append(("validation", _Head(data.val, self.options.eval_samples)))
        scores = evaluate_sets(run, data, "w", sets=sets)
        out = {"model": run.config.model.name,
               "weights": dict(zip(run.source_names, run.weights.probs().tolist())),
               "trained_on": {"steps": run.config.run.steps, "samples": self.samples_seen,
                              "supervised_tokens": self.tokens_seen},
               "sources": {t.name: scores[t.name] for t in data.train}}
        if data.val is not None:
            out["validation"] = scores["validation"]
        if test is not None:
            out["test"] = test
        return out

    def state_dict(self) -> dict:
        return {"samples_seen": self.samples_seen, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict) -> None:
        self.samples_seen, self.tokens_seen = int(state["samples_seen"]), int(state["tokens_seen"])


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


@hookimpl
def scalebio_solver():
    return Train


@hookimpl
def scalebio_run_end(run, result):
    if not isinstance(run.solver, Train):
        return
    scores = run.solver.evaluate_final(result.get("test"))  # collective: every rank takes part
    if run.is_main:
        from scalebio.outputs import atomic_write

        atomic_write(run.out_dir / "eval.json", json.dumps(scores, indent=2) + "\n")
        scored = {**scores["sources"], **({"validation": scores["validation"]} if "validation" in scores else {})}
        parts = [f"{name} {s['loss']:.4f}" for name, s in scored.items() if s["loss"] is not None]
        n = run.solver.options.eval_samples
        print(f"eval.json: token-mean loss of the final w: {', '.join(parts)} "
              f"({'all samples' if n is None else f'the first {n} samples of each'})")
