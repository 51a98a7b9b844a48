"""Run a function on N CPU ranks over gloo, from a test, without ever hanging CI.

Each rank is a fresh spawned process (never fork: megatron-core and torch threads do not survive
it) with one torch thread, a private rendezvous port and the torchrun environment variables. The
function's return value travels back through a queue as ``torch.save`` bytes (shared-memory
tensors break once the child exits). A rank that raises sends its traceback; a rank that hangs
makes ``run_ranks`` kill them all after ``timeout`` seconds and fail with the ranks that were
missing.
"""
from __future__ import annotations

import io
import os
import queue
import socket
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, q, args, kwargs) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        value = fn(rank, world, *args, **kwargs)
        buf = io.BytesIO()
        torch.save(value, buf)
        q.put({"rank": rank, "ok": True, "value": buf.getvalue()})
    except BaseException:  # report everything, or the parent waits for a message that never comes
        q.put({"rank": rank, "ok": False, "error": traceback.format_exc()})


def run_ranks(fn, world: int, *args, timeout: float = 300, **kwargs) -> list:
    """``fn(rank, world, *args, **kwargs)`` on ``world`` ranks; returns the values by rank."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, q, args, kwargs), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        while len(results) < world:
            msg = q.get(timeout=timeout)
            results[msg["rank"]] = msg
            if not msg["ok"]:
                break  # the others may now wait forever in a collective
    except queue.Empty:
        missing = sorted(set(range(world)) - set(results))
        raise TimeoutError(f"ranks {missing} of {world} sent nothing within {timeout} s") from None
    finally:
        for p in procs:
            p.join(timeout=5 if len(results) == world and all(m["ok"] for m in results.values()) else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    failed = [m for m in results.values() if not m["ok"]]
    if failed:
        raise AssertionError(f"rank {failed[0]['rank']} of {world} failed:\n{failed[0]['error']}")
    return [torch.load(io.BytesIO(results[r]["value"]), weights_only=False) for r in range(world)]
