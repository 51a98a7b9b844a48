"""Benchmark: the cost of ScaleBiO against plain fine-tuning, measured side by side in one run.

1. Time of one ScaleBiO step (u pass, w pass over the train batch plus a validation batch of the
   same size, two optimizer steps, the lambda update) divided by the time of one plain
   fine-tuning step (one pass over the same batch, one optimizer step) on the same model. Three
   passes are inherent, so 3.0 is the target; more means overhead.
2. Trainable-state bytes (gradient buffers + optimizer state) of one model with LISA gamma=2
   divided by the same with every layer trainable.

Steps of the two kinds are interleaved in blocks so that machine drift hits both alike.

    scalebio bench [--model tiny] [--set model.num_layers=8 ...] [--repeats 5]   (or python tools/bench.py)
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

HELP = "benchmark: step time of ScaleBiO vs plain fine-tuning, and LISA's trainable-state memory"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--data", default=None, help="data YAML (default: the embedded demo data)")
    ap.add_argument("--batch", type=int, default=32, help="global batch = validation batch")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=2, help="LISA layers for the memory ratio")
    ap.add_argument("--repeats", type=int, default=5, help="blocks of each kind")
    ap.add_argument("--block", type=int, default=4, help="steps per block")
    ap.add_argument("--set", dest="sets", action="append", default=[])


def main(args) -> int:
    from . import fail, guarded

    for flag in ("batch", "micro_batch", "seq", "gamma", "repeats", "block"):
        if getattr(args, flag) < 1:  # before the model is built: a flag, not the --set it becomes, is named
            return fail(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.batch % args.micro_batch:
        return fail(f"--batch {args.batch} is not a multiple of --micro-batch {args.micro_batch}")
    return guarded(lambda: _bench(args))


def _bench(args) -> None:
    import torch

    from scalebio.config import ConfigError

    from scalebio.runner import RunRequest, open_run, prepare
    from scalebio_plugins.minimax import loss_coefficients

    sets = [f"run.global_batch={args.batch}", f"run.val_batch={args.batch}",
            f"run.micro_batch={args.micro_batch}", f"data.seq_length={args.seq}", "run.progress=false",
            "run.steps=1000000"] + args.sets
    with tempfile.TemporaryDirectory() as tmp:
        req = RunRequest(model=args.model, data=args.data, sets=tuple(sets), out=f"{tmp}/run")
        with open_run(prepare(req), verbose=False) as (ctx, data):
            backend, solver, cfg = ctx.backend, ctx.solver, ctx.config
            k = len(ctx.source_names)
            if args.gamma > backend.num_layers:  # a LISA set of every layer would price nothing
                raise ConfigError(f"--gamma {args.gamma} exceeds the model's {backend.num_layers} layers; give at "
                                  f"most {backend.num_layers}")
            layers = frozenset(range(backend.num_layers))
            for m in ("u", "w"):
                backend.set_trainable(m, layers, keep_state=False)
            batch, val = data.next_train(args.batch), data.next_val(args.batch)
            coef, _ = loss_coefficients(ctx.weights.probs(), batch.source_counts(k))

            def plain_step():
                backend.forward_backward("u", batch, coef)
                backend.optimizer_step("u", cfg.optim.lr, cfg.optim.clip_grad)

            step_no = [0]

            def scalebio_step():
                solver.step(step_no[0], batch, val)
                step_no[0] += 1

            for fn in (plain_step, scalebio_step):  # warm-up
                fn()
            times = {"plain": [], "scalebio": []}
            for _ in range(args.repeats):
                for name, fn in (("plain", plain_step), ("scalebio", scalebio_step)):
                    t0 = time.perf_counter()
                    for _ in range(args.block):
                        fn()
                    times[name].append((time.perf_counter() - t0) / args.block)
            plain, bilevel = statistics.median(times["plain"]), statistics.median(times["scalebio"])

            full = backend.trainable_state_bytes("u")
            full_params = backend.trainable_parameters("u")
            backend.set_trainable("u", frozenset(range(args.gamma)), keep_state=False)
            plain_step()  # optimizer state exists only after a step
            lisa = backend.trainable_state_bytes("u")
            lisa_params = backend.trainable_parameters("u")

    model = cfg.model
    total = sum(full.values())
    total_lisa = sum(lisa.values())
    print(f"model {model.name}: {model.num_layers} layers, hidden {model.hidden_size}, vocab {model.vocab_size}; "
          f"batch {args.batch} x {args.seq} tokens (validation batch the same), micro-batch {args.micro_batch}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} blocks "
          f"of {args.block} steps")
    print()
    print(f"{'':34} {'plain FT':>12} {'ScaleBiO':>12} {'ratio':>8}")
    print(f"{'step time (s)':34} {plain:>12.4f} {bilevel:>12.4f} {bilevel / plain:>8.3f}   (target 3.0 +- 5%)")
    print()
    print(f"{'':34} {'full':>12} {f'LISA g={args.gamma}':>12} {'ratio':>8}")
    print(f"{'trainable parameters':34} {full_params:>12,} {lisa_params:>12,} {lisa_params / full_params:>8.3f}")
    print(f"{'gradient buffer bytes':34} {full['grads']:>12,} {lisa['grads']:>12,} "
          f"{lisa['grads'] / full['grads']:>8.3f}")
    print(f"{'optimizer state bytes':34} {full['optimizer']:>12,} {lisa['optimizer']:>12,} "
          f"{lisa['optimizer'] / full['optimizer']:>8.3f}")
    print(f"{'trainable-state bytes (sum)':34} {total:>12,} {total_lisa:>12,} {total_lisa / total:>8.3f}")
