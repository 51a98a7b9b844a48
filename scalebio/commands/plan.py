"""``scalebio plan``: per-GPU memory of a ScaleBiO run (two model copies, LISA's active set) for
each TP x PP x DP layout of a GPU count, and the layouts that fit (``tools/plan.py`` is the same).

    scalebio plan --model qwen2.5-32b --gpus 8 --gpu-memory 80
    scalebio plan --model llama-3-8b --gpus 1 --gpu-memory 80 --micro-batch 2 --seq 2048
    scalebio plan --model qwen2.5-7b --gpus 8 --tp 4 --pp 1        # one layout

Counts weights (u and w), fp32 gradient buffers and Adam state of the trainable set (the worst
LISA draw: all gamma layers on one stage), in bf16 the fp32 masters of the frozen layers
(--frozen-masters, as megatron.frozen_masters: on the device, or in host memory, column "host"),
and the activations kept for backward of the longer (w) pass; the reported total is the device
memory of the worst pipeline stage. A layout "fits" when total x 1.1 + 3 GiB (CUDA context, NCCL,
fragmentation) is within the GPU memory.
"""
from __future__ import annotations

import argparse

from . import fail

HELP = "memory planner: per-GPU memory of each parallel layout, and the layouts that fit"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--global-batch", type=int, default=128)
    ap.add_argument("--val-batch", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=2, help="LISA layers (default 2)")
    ap.add_argument("--full", action="store_true", help="every layer trains (no LISA)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--distributed-optimizer", action="store_true")
    ap.add_argument("--frozen-masters", choices=["host", "device", "residual"], default="host",
                    help="where bf16 LISA keeps frozen layers' fp32 masters (megatron.frozen_masters)")
    ap.add_argument("--local", action="store_true", help="local layer spec (no Transformer Engine: s^2 attention)")
    ap.add_argument("--tp", type=int)
    ap.add_argument("--pp", type=int)
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")


def main(args) -> int:
    from scalebio.config import ConfigError, load_model
    from scalebio_plugins.megatron import memory

    try:
        model, _ = load_model(args.model)
    except ConfigError as exc:
        return fail(str(exc))
    problem = _bad_argument(args, model)
    if problem:
        return fail(problem)
    work = memory.Workload(micro_batch=args.micro_batch, seq_length=args.seq, global_batch=args.global_batch,
                           val_batch=args.val_batch, gamma=None if args.full else args.gamma,
                           precision=args.precision, distributed_optimizer=args.distributed_optimizer,
                           transformer_engine=not args.local, frozen_masters=args.frozen_masters)
    gpu_bytes = int(args.gpu_memory * memory.GiB)
    plans = memory.recommend(model, args.gpus, gpu_bytes, work)
    if args.tp or args.pp:
        wanted = [lay for lay in memory.layouts_for(model, args.gpus) if _chosen(lay, args)]
        if not wanted:  # the layout itself is impossible, whatever the batches
            valid = ", ".join(str(lay) for lay in memory.layouts_for(model, args.gpus)) or "none"
            return fail(f"{_flags(args)}: no layout of {args.gpus} GPUs for {model.name} has it (TP must be 1, 2, "
                        f"4 or 8 and divide the GPUs, the {model.num_attention_heads} heads and the query groups; "
                        f"PP must divide the {model.num_layers} layers); valid layouts: {valid}")
        plans = [p for p in plans if _chosen(p.layout, args)]
    if not plans:
        return fail(f"no layout of {args.gpus} GPUs for {model.name} divides the batches: --global-batch "
                    f"{args.global_batch} and --val-batch {args.val_batch} must be multiples of --micro-batch "
                    f"{args.micro_batch} x the data-parallel size")
    g = memory.GiB
    lisa = "every layer" if args.full else f"LISA gamma={args.gamma}"
    print(f"{model.name}: {args.gpus} x {args.gpu_memory:g} GiB, {args.precision}, micro-batch {args.micro_batch} "
          f"x {args.seq} tokens, global batch {args.global_batch} + validation {args.val_batch}, {lisa}, "
          f"{'distributed' if args.distributed_optimizer else 'replicated'} optimizer, "
          f"{'local spec' if args.local else 'Transformer Engine'}"
          f"{f', frozen masters on {args.frozen_masters}' if args.precision == 'bf16' else ''}; "
          f"GiB per GPU (worst stage; total = device, host = host memory per GPU)\n")
    head = ["layout", "weights", "grads", "optimizer", "masters", "activations", "total", "host", "fits"]
    rows = []
    for p in plans:
        w = p.worst
        rows.append([str(p.layout)] + [f"{w.bytes[k] / g:.1f}" for k in ("weights", "grads", "optimizer",
                                                                        "frozen_masters", "activations")]
                    + [f"{w.total / g:.1f}", f"{w.host / g:.1f}", "yes" if p.fits(gpu_bytes) else "no"])
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
        for r in [head] + rows:
            print("  ".join(c.rjust(wd) if i else c.ljust(wd) for i, (c, wd) in enumerate(zip(r, widths))))
    best = plans[0]
    if best.fits(gpu_bytes):
        print(f"\nrecommended: {best.layout}  (--tp {best.layout.tp} --pp {best.layout.pp}; "
              f"torchrun --nproc-per-node {min(args.gpus, 8)})")
    else:
        print(f"\nno layout fits {args.gpu_memory:g} GiB: lower the micro-batch or sequence length, use LISA, "
              f"--distributed-optimizer, or more GPUs")
    return 0


def _chosen(layout, args) -> bool:
    return (args.tp is None or layout.tp == args.tp) and (args.pp is None or layout.pp == args.pp)


def _flags(args) -> str:
    return " ".join(f"--{k} {v}" for k, v in (("tp", args.tp), ("pp", args.pp)) if v is not None)


def _bad_argument(args, model):
    """The first impossible argument, as a message (None: all fine); checked before any pricing."""
    import math

    for flag, value in (("--gpus", args.gpus), ("--micro-batch", args.micro_batch), ("--seq", args.seq),
                        ("--global-batch", args.global_batch), ("--val-batch", args.val_batch),
                        ("--gamma", args.gamma), ("--tp", args.tp), ("--pp", args.pp)):
        if value is not None and value < 1:
            return f"{flag} must be at least 1, got {value}"
    if not (math.isfinite(args.gpu_memory) and args.gpu_memory > 0):
        return f"--gpu-memory must be a positive number of GiB, got {args.gpu_memory:g}"
    if not args.full and args.gamma > model.num_layers:  # LISA cannot select more layers than there are
        return (f"--gamma {args.gamma} exceeds the {model.num_layers} layers of {model.name}; give at most "
                f"{model.num_layers}, or --full for every layer")
    return None
