"""Benchmark: the cost of ScaleBiO against plain fine-tuning, measured side by side in one run.

1. Step time, four kinds of step on the same model and batch: a plain fine-tuning (SFT) step (one
   pass over the train batch, one optimizer step) and a ScaleBiO step (u pass, w pass over the
   train batch plus a validation batch of the same size, two optimizer steps, the lambda update),
   each with every layer trainable and with LISA (``--gamma`` body layers in both u and w, the
   embeddings, final norm and output layer always trainable). Printed ratios:
   - ScaleBiO / SFT, both full: three passes are inherent, so 3.0 is the target; more is overhead;
   - ScaleBiO with LISA / full SFT: frozen layers skip their weight-gradient GEMMs, so about 2.0
     (6 of a full step's 3 units: two forwards of the batch, one of the validation batch, and three
     backwards of input gradients only, over the frozen layers); the goal is <= 2.1;
   - SFT with LISA / full SFT: what freezing saves in one pass. Trainable embeddings need the
     input gradient of every layer below them, so the backward still runs through every layer and
     the floor is about 2/3 (forward + input-gradient backward), not gamma/num_layers.
2. Trainable-state bytes of one model, every layer trainable vs LISA: gradient buffers, optimizer
   state (with bf16: the fp32 masters of the trainable parameters), and with bf16 the fp32 masters
   of the frozen layers (``megatron.frozen_masters``: host memory by default, or on the device),
   after every layer has trained once, as in a LISA run past its first switches.

Steps of the four kinds are interleaved in blocks so that machine drift hits all alike; before
each block the trainable set is switched (keeping state, as a LISA run does) and one untimed
step is taken.

    scalebio bench [--model tiny] [--set model.num_layers=8 ...] [--repeats 5]   (or python tools/bench.py)
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

HELP = "benchmark: step time of ScaleBiO vs plain fine-tuning (full and LISA), and trainable-state memory"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--data", default=None, help="data YAML (default: the embedded demo data)")
    ap.add_argument("--batch", type=int, default=32, help="global batch = validation batch")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=2, help="LISA body layers (trainable in u and w)")
    ap.add_argument("--repeats", type=int, default=5, help="blocks of each kind")
    ap.add_argument("--block", type=int, default=4, help="timed steps per block")
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
            precision = getattr(backend.options, "precision", "fp32")
            where = getattr(backend.options, "frozen_masters", None)
            k = len(ctx.source_names)
            if not 0 < args.gamma < backend.num_layers:
                raise ConfigError(f"--gamma {args.gamma} exceeds the model's {backend.num_layers} layers minus one; "
                                  f"give 1 to {backend.num_layers - 1} (a LISA set of every layer prices nothing)")
            full_set = frozenset(range(backend.num_layers))
            # the top layers: with trainable embeddings the backward runs through every layer anyway
            lisa_set = frozenset(range(backend.num_layers - args.gamma, backend.num_layers))
            batch, val = data.next_train(args.batch), data.next_val(args.batch)
            coef, _ = loss_coefficients(ctx.weights.probs(), batch.source_counts(k))

            def plain_step():
                backend.forward_backward("u", batch, coef)
                backend.optimizer_step("u", cfg.optim.lr, cfg.optim.clip_grad)

            step_no = [0]

            def scalebio_step():
                solver.step(step_no[0], batch, val)
                step_no[0] += 1

            kinds = {("sft", "full"): (plain_step, full_set), ("scalebio", "full"): (scalebio_step, full_set),
                     ("sft", "lisa"): (plain_step, lisa_set), ("scalebio", "lisa"): (scalebio_step, lisa_set)}

            def switch(layers):
                for m in ("u", "w"):
                    backend.set_trainable(m, layers, keep_state=True)

            times = {kind: [] for kind in kinds}
            for _ in range(args.repeats):
                for kind, (fn, layers) in kinds.items():
                    switch(layers)
                    fn()  # untimed: the first step after a rebuild allocates optimizer state
                    t0 = time.perf_counter()
                    for _ in range(args.block):
                        fn()
                    times[kind].append((time.perf_counter() - t0) / args.block)
            t = {kind: statistics.median(v) for kind, v in times.items()}

            switch(full_set)
            plain_step()  # optimizer state exists only after a step
            full = backend.trainable_state_bytes("u")
            full_params = backend.trainable_parameters("u")
            switch(lisa_set)  # every layer has trained: the frozen ones leave their masters behind
            plain_step()
            lisa = backend.trainable_state_bytes("u")
            lisa_params = backend.trainable_parameters("u")

    model = cfg.model
    g = f"LISA g={args.gamma}"
    print(f"model {model.name}: {model.num_layers} layers, hidden {model.hidden_size}, vocab {model.vocab_size}, "
          f"{precision}; batch {args.batch} x {args.seq} tokens (validation batch the same), "
          f"micro-batch {args.micro_batch}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"median of {args.repeats} blocks of {args.block} steps; LISA layers {sorted(lisa_set)}")
    print()
    print(f"{'step time (s)':34} {'SFT':>12} {'ScaleBiO':>12} {'ratio':>8}")
    print(f"{'all layers trainable':34} {t['sft', 'full']:>12.4f} {t['scalebio', 'full']:>12.4f} "
          f"{t['scalebio', 'full'] / t['sft', 'full']:>8.3f}   (target 3.0 +- 5%)")
    print(f"{g:34} {t['sft', 'lisa']:>12.4f} {t['scalebio', 'lisa']:>12.4f} "
          f"{t['scalebio', 'lisa'] / t['sft', 'lisa']:>8.3f}")
    print(f"{f'ScaleBiO {g} / full SFT':34} {'':>12} {'':>12} {t['scalebio', 'lisa'] / t['sft', 'full']:>8.3f}"
          f"   (goal <= 2.1)")
    print(f"{f'SFT {g} / full SFT':34} {'':>12} {'':>12} {t['sft', 'lisa'] / t['sft', 'full']:>8.3f}"
          f"   (embeddings train: the backward runs through every layer)")
    print()
    rows = [("trainable parameters", full_params, lisa_params),
            ("gradient buffer bytes", full["grads"], lisa["grads"]),
            ("optimizer state bytes", full["optimizer"], lisa["optimizer"])]
    if precision == "bf16":
        rows += [("frozen fp32 masters, device", full["frozen_masters"], lisa["frozen_masters"]),
                 ("frozen fp32 masters, host", full["frozen_masters_host"], lisa["frozen_masters_host"])]
    device = [sum(d[key] for key in ("grads", "optimizer", "frozen_masters")) for d in (full, lisa)]
    rows.append(("trainable state, device (sum)", *device))
    if precision == "bf16":
        rows.append((f"... plus host (frozen_masters={where})", *(d + s["frozen_masters_host"]
                                                                   for d, s in zip(device, (full, lisa)))))
    print(f"{'bytes':34} {'full':>12} {g:>12} {'ratio':>8}")
    for name, a, b in rows:
        print(f"{name:34} {a:>12,} {b:>12,} " + (f"{b / a:>8.3f}" if a else f"{'-':>8}"))
    return 0
