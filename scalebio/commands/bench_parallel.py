"""Benchmark: step time of parallel layouts against one process, same model and global batch.

Each layout runs ScaleBiO steps (u pass, w pass with validation rows, both optimizer steps,
lambda update) on the same data; the cores of the machine are split evenly over the ranks
(torch threads per rank = cores / ranks), so a layout that adds no hidden serial work runs at
about the single-process time. Ranks are spawned over gloo on CPU (NCCL on GPUs).

    scalebio bench-parallel [--layouts tp1,tp2,pp2,dp2] [--steps 6] [--set model.hidden_size=512]
    (or python tools/bench_parallel.py)
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time

HELP = "benchmark: step time of parallel layouts (TP, PP, DP) against one process"

LAYOUTS = {"tp1": (1, 1, 1), "tp2": (2, 1, 1), "pp2": (1, 2, 1), "dp2": (1, 1, 2), "tp2pp2": (2, 2, 1),
           "tp2dp2": (2, 1, 2)}
MODEL = ("model.num_layers=4", "model.hidden_size=256", "model.ffn_hidden_size=704",
         "model.num_attention_heads=8", "model.num_query_groups=2")


def _rank(rank, world, port, tp, pp, sets, steps, threads, out, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch

    torch.set_num_threads(threads)
    from scalebio.runner import RunRequest, open_run, prepare

    req = RunRequest(model="tiny", sets=tuple(sets) + ("run.progress=false",), out=out, tp=tp, pp=pp,
                     steps=10_000)
    try:
        with open_run(prepare(req), verbose=False) as (ctx, data):
            cfg = ctx.config
            for m in ("u", "w"):
                ctx.backend.set_trainable(m, frozenset(range(cfg.model.num_layers)), keep_state=False)
            batches = [(data.next_train(cfg.run.global_batch), data.next_val(cfg.run.val_batch))
                       for _ in range(steps + 2)]
            times = []
            for i, (b, v) in enumerate(batches):
                ctx.backend.barrier()
                t0 = time.perf_counter()
                ctx.solver.step(i, b, v)
                ctx.backend.barrier()
                times.append(time.perf_counter() - t0)
            q.put((rank, statistics.median(times[2:]), None))
    except Exception:  # report, never hang the parent
        import traceback

        q.put((rank, None, traceback.format_exc()))


def run_layout(name, sets, steps, cores):
    """``name`` is a layout, optionally with ``@threads`` per rank (default: the cores split evenly)."""
    import torch.multiprocessing as mp

    layout, _, forced = name.partition("@")
    tp, pp, dp = LAYOUTS[layout]
    world = tp * pp * dp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    threads = int(forced) if forced else max(1, cores // world)
    with tempfile.TemporaryDirectory() as out:
        procs = [ctx.Process(target=_rank, args=(r, world, port, tp, pp, sets, steps, threads, f"{out}/run", q))
                 for r in range(world)]
        for p in procs:
            p.start()
        results = [q.get(timeout=900) for _ in procs]
        for p in procs:
            p.join()
    errors = [e for _, _, e in results if e]
    if errors:
        raise RuntimeError(errors[0])
    return max(t for _, t, _ in results), world, threads


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--layouts", default="tp1,tp1@1,tp2,pp2,dp2",
                    help="comma-separated; NAME@T runs T threads per rank (tp1@1: one process on one core)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--set", dest="sets", action="append", default=[])


def main(args) -> int:
    sets = list(MODEL) + ["run.global_batch=16", "run.val_batch=16", "run.micro_batch=4",
                          "data.seq_length=128"] + args.sets
    names = args.layouts.split(",")
    results = {}
    for name in names:
        results[name] = run_layout(name, sets, args.steps, args.cores)
        print(f"  measured {name}: {results[name][0]:.3f} s/step", file=sys.stderr, flush=True)
    base = results.get("tp1", next(iter(results.values())))[0]
    settings = dict(x.split("=", 1) for x in sets)  # later --set wins
    print(f"ScaleBiO step; {' '.join(f'{k.split(chr(46))[-1]}={v}' for k, v in settings.items())}; "
          f"{args.cores} cores split over the ranks; median of {args.steps} steps\n")
    print(f"{'layout':8} {'ranks':>5} {'threads/rank':>12} {'s/step':>8} {'vs tp1':>7} {'core-s/step':>12}")
    for name in names:
        t, world, threads = results[name]
        print(f"{name:8} {world:>5} {threads:>12} {t:>8.3f} {t / base:>7.2f} {t * world * threads:>12.3f}")
    return 0
