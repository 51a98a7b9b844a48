"""Resumable checkpoints of a run: when and where they are written, the run's common state, and
the directory protocol that makes them atomic.

A run directory's checkpoints live in ``checkpoints/step-NNNNNNNN`` (N = steps done):

    scalebio_state.json   manifest, written last: a directory without it is not a checkpoint
    common.pt             pi and its optimizer, solver, layer selection, data samplers, the RNG
                          states of every rank, the resolved configuration
    u/, w/, ...           the backend's state of each model (``Backend.save_state``)

Every rank writes into ``checkpoints/.step-NNNNNNNN.partial``; when all of them report success the
main rank writes the manifest and renames the directory, so a checkpoint is visible only when it
is complete on every rank, and a kill at any moment leaves the previous one as it was. Old
checkpoints are renamed to a hidden name before they are deleted. Hidden directories are never
read; a resumed run removes the ones a killed run left behind and says so.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import ConfigError

CHECKPOINTS = "checkpoints"
MANIFEST = "scalebio_state.json"
COMMON = "common.pt"
FORMAT, VERSION = "scalebio-run-state", 1
_NAME = re.compile(r"^step-(\d{8})$")



class CheckpointError(ConfigError):
    """A checkpoint or Hugging Face directory that cannot be read, converted, written or loaded."""


class Preempted(Exception):
    """The run stopped at a signal after saving a checkpoint (the CLI exits with 75, sysexits'
    EX_TEMPFAIL: try again, i.e. resume)."""

    def __init__(self, message: str):
        super().__init__(message)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


# --------------------------------------------------------------------------- finding checkpoints


def scan(run_dir) -> tuple:
    """``(complete, ignored)``: complete checkpoints as ``[(step, path)]`` by step, and the
    directories that look like checkpoints but are not complete as ``[(path, why)]``."""
    root = Path(run_dir) / CHECKPOINTS
    complete, ignored = [], []
    if not root.is_dir():
        return complete, ignored
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".step-"):
            ignored.append((entry, "half-written, or being deleted, by a run that was stopped"))
            continue
        m = _NAME.match(entry.name)
        if not m or not entry.is_dir():
            continue
        try:
            manifest = json.loads((entry / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            ignored.append((entry, f"no readable {MANIFEST}: not complete"))
            continue
        if manifest.get("format") != FORMAT or manifest.get("step") != int(m.group(1)) \
                or not (entry / COMMON).is_file():
            ignored.append((entry, f"{MANIFEST} does not describe this directory"))
            continue
        complete.append((int(m.group(1)), entry))
    return complete, ignored


def not_a_run_directory(run_dir: Path) -> str:
    """Why ``--resume run_dir`` is refused: a missing path and a file are said as such."""
    if not run_dir.exists():
        return f"--resume {run_dir}: the path does not exist (give the run directory of the run to continue)"
    if not run_dir.is_dir():
        return f"--resume {run_dir}: the path is a file, not a run directory"
    return f"--resume {run_dir}: not a run directory (no config.yaml there)"


def latest_checkpoint(run_dir, say=print) -> tuple:
    """``(step, path)`` of the latest complete checkpoint of a run directory; every incomplete one
    is named in a message. An error when there is none."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(not_a_run_directory(run_dir))
    complete, ignored = scan(run_dir)
    for path, why in ignored:
        say(f"ignoring {path}: {why}")
    if not complete:
        raise CheckpointError(f"--resume {run_dir}: no complete checkpoint in {run_dir / CHECKPOINTS} (a run writes "
                              f"one every run.save_every steps, at the end, and when it is stopped by SIGTERM or "
                              f"SIGINT)")
    return complete[-1]


def read_common(path: Path) -> dict:
    try:
        common = torch.load(Path(path) / COMMON, map_location="cpu", weights_only=False)  # written by scalebio
    except Exception as exc:  # a damaged file: torch/pickle raise many types
        raise CheckpointError(f"cannot read {Path(path) / COMMON}: {exc}") from None
    if common.get("format") != FORMAT or common.get("version") != VERSION:
        raise CheckpointError(f"{Path(path) / COMMON}: format {common.get('format')!r} version "
                              f"{common.get('version')!r}; this scalebio reads {FORMAT!r} version {VERSION}")
    return common


def remove_stale(run_dir, say=print) -> None:
    """Remove the hidden directories a killed run left in ``checkpoints/`` (main rank only)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if entry.name.startswith(".step-") and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            say(f"removed {entry}, left by a run that was stopped while writing or deleting a checkpoint")


# --------------------------------------------------------------------------- configuration


def config_differences(saved: dict, now: dict, sections, allowed) -> list:
    """``[(dotted key, saved value, value now)]`` over ``sections``, except the ``allowed`` keys
    (tuples of path segments)."""
    out = []

    def walk(a, b, path):
        if path in allowed:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                walk(a.get(key, _MISSING), b.get(key, _MISSING), path + (key,))
        elif a != b and not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b)):
            out.append((".".join(str(p) for p in path), a, b))

    for section in sections:
        walk(saved.get(section, _MISSING), now.get(section, _MISSING), (section,))
    return out


class _Missing:
    def __repr__(self):
        return "(not set)"


_MISSING = _Missing()


# --------------------------------------------------------------------------- saving


def _rank_state(backend) -> dict:
    """This rank's random number generators (and the backend's own per-rank state)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "backend": backend.state_dict()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rank_state(backend, state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    backend.load_state_dict(state["backend"])


def _error_text(exc: BaseException, where: Path) -> str:
    """A one-line reason from an OSError or torch.distributed.checkpoint's CheckpointException."""
    failures = getattr(exc, "failures", None)
    if failures:
        exc = next(iter(failures.values()))[0]
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    # torch.save's zip writer reports a full disk as "RuntimeError: [enforce fail at
    # inline_container.cc] unexpected pos": name the cause when the file system is (nearly) full
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    if free is not None and free < _NEARLY_FULL:
        return f"No space left on device ({free} bytes free in {where}; torch said {type(exc).__name__}: {exc})"
    return f"{type(exc).__name__}: {exc}"


_NEARLY_FULL = 16 << 20  # bytes


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _checkpoint_failures():
    from torch.distributed.checkpoint.api import CheckpointException

    return (OSError, CheckpointException)


def save_checkpoint(ctx, data, step: int, resolved: dict, reason: str, keep: int) -> Path:
    """Collective: write checkpoint ``step`` (steps done) of the run atomically and keep the latest
    ``keep``. Raises :class:`CheckpointError`, on every rank, when any rank cannot write; the
    previous checkpoints are then untouched."""
    backend, main = ctx.backend, ctx.is_main
    root = ctx.out_dir / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.partial"
    failures = _checkpoint_failures()

    def agree(error):
        errors = [e for e in backend.all_gather_object(error) if e]
        if errors:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            complete, _ = scan(ctx.out_dir)
            intact = f"the previous checkpoint {complete[-1][1]} is intact" if complete else "no checkpoint was written"
            raise CheckpointError(f"cannot write the checkpoint of step {step} in {root}: {errors[0]}; {intact}. "
                                  f"Free space or choose another --out")

    error = None
    if main:
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        except failures as exc:
            error = _error_text(exc, root)
    agree(error)
    error = None
    try:
        backend.save_state(tmp)
    except failures as exc:
        error = _error_text(exc, root)
    ranks = backend.all_gather_object(_rank_state(backend))
    if main and error is None:
        common = {"format": FORMAT, "version": VERSION, "step": step, "config": resolved,
                  "weights": ctx.weights.state_dict(), "solver": ctx.solver.state_dict(),
                  "layers": ctx.layers.state_dict(), "data": data.state_dict(), "rng": ranks,
                  "schedule_steps": ctx.config.run.steps}
        manifest = {"format": FORMAT, "version": VERSION, "step": step, "steps": ctx.config.run.steps,
                    "reason": reason, "models": list(ctx.solver.models), "world_size": len(ranks),
                    "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            import io

            buf = io.BytesIO()
            torch.save(common, buf)
            _write_file(tmp / COMMON, buf.getvalue())
            _write_file(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
            _fsync_dir(tmp)
            old = root / f".{final.name}.old"
            if final.exists():  # the same step written again (a resumed run): replace it
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(root)
            shutil.rmtree(old, ignore_errors=True)
        except failures as exc:
            error = _error_text(exc, root)
    agree(error)
    if main:
        complete, _ = scan(ctx.out_dir)
        for _, path in complete[:-keep] if keep > 0 else []:
            doomed = root / f".{path.name}.deleting"
            os.replace(path, doomed)  # hidden first: a kill while deleting leaves no half checkpoint
            shutil.rmtree(doomed, ignore_errors=True)
    backend.barrier()
    ctx.hooks.scalebio_checkpoint_saved(run=ctx, step=step, path=str(final))
    return final


# --------------------------------------------------------------------------- resuming


@dataclass
class ResumePoint:
    """The checkpoint a resumed run continues from."""

    path: Path
    step: int
    common: dict


def restore(ctx, data, point: ResumePoint) -> int:
    """Give the built run the state of ``point``; returns the first step to run."""
    common, step = point.common, point.step
    ctx.weights.load_state_dict(common["weights"])
    ctx.solver.load_state_dict(common["solver"])
    ctx.layers.load_state_dict(common["layers"])
    data.load_state_dict(common["data"])
    # the trainable sets in force when the checkpoint was taken, then their state
    selection, _ = ctx.layers.select(step - 1)
    for m in ctx.solver.models:
        ctx.backend.set_trainable(m, selection.layers[m], selection.keep_state)
    ctx.backend.load_state(point.path)
    ranks = common["rng"]
    world = len(ctx.backend.all_gather_object(None))
    if len(ranks) == world:  # per-rank streams only map onto the same ranks
        _set_rank_state(ctx.backend, ranks[_rank()])
    return step


# --------------------------------------------------------------------------- signals


class StopSignals:
    """While active, SIGTERM and SIGINT ask the run to stop after the current step (and save);
    a second one ends the process at once (the default action of the signal)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: Optional[int] = None
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        name = signal.Signals(signum).name
        # os.write: a signal may interrupt a print, and print is not reentrant
        os.write(2, f"\n{name} received: finishing this step, then saving a checkpoint; send {name} again to stop "
                    f"at once without saving\n".encode())

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        return False


def resume_command(run_dir: Path) -> str:
    """The command that continues this run, as it was launched."""
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    base = "python tools/run.py" if prog == "run.py" else "scalebio run"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        nodes = world // local
        launcher = f"torchrun --nproc-per-node {local} " + (f"--nnodes {nodes} (and your rendezvous options) "
                                                             if nodes > 1 else "")
        base = launcher + ("tools/run.py" if base.startswith("python") else "-m scalebio.cli run")
    return f"{base} --resume {run_dir}"
