"""What a run leaves in its directory: resolved config, metrics.jsonl, weights.json, the pi
trajectory as CSV and PNG. Files that are replaced are written atomically (temp file + rename),
so a crash or kill never leaves a half-written one."""
from __future__ import annotations

import csv
import dataclasses
import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from .config import ConfigError

# a file system with less free space than this cannot take a run's outputs (or an export)
MIN_FREE_BYTES = 4 << 20
# what a run writes in its directory: --overwrite removes these and nothing else
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "weights.json", "pi.csv", "pi.png", "test.json", "final",
               "final.partial", "checkpoints")


def _tmp_name(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


def is_temporary(name: str) -> bool:
    """A temporary file of :func:`atomic_write` (left only by a killed process)."""
    return name.startswith(".") and ".tmp-" in name


def write_error(path, exc: OSError) -> ConfigError:
    return ConfigError(f"cannot write {path}: {exc.strerror or exc}; free some space or give another output path")


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then rename it into place. A failure
    (a full disk, say) leaves neither a temporary file nor a torn ``path``, and is a ConfigError."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from None


def check_output_path(path, what: str, directory: bool = False, min_free: int = MIN_FREE_BYTES) -> None:
    """Refuse, before any heavy work, an output that cannot be written: a file where a directory
    is wanted (or the reverse), a path under a file, a read-only place, a full file system. Creates
    nothing."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if directory and not path.is_dir():
            raise ConfigError(f"{what} {path} is a file, not a directory; give another path")
        if not directory and path.is_dir():
            raise ConfigError(f"{what} {path} is a directory; give a file name")
    base = path if directory and path.is_dir() else path.parent
    while not base.exists():  # the nearest existing ancestor: everything below it is created
        base = base.parent
    if not base.is_dir():
        raise ConfigError(f"{what} {path}: {base} is a file, so nothing can be written under it; give another path")
    try:  # a real probe: permission bits say nothing about a read-only mount, or to root
        tempfile.TemporaryFile(dir=base, prefix=".scalebio-probe-").close()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot write in {base} ({exc.strerror}); give a writable path") from None
    st = os.statvfs(base)
    free = st.f_bavail * st.f_frsize
    if free < min_free:
        raise ConfigError(f"{what} {path}: the file system of {base} is full ({free >> 10} KiB free); free some "
                          f"space or give another path")


def check_run_dir(out: Path, overwrite: bool) -> None:
    """A run directory must be new or empty; with ``overwrite`` it may hold an earlier run's
    outputs (RUN_OUTPUTS), but nothing else."""
    check_output_path(out, "run directory", directory=True)
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if not overwrite:
        raise ConfigError(f"run directory {out} already exists and is not empty; give another --out or pass "
                          f"--overwrite")
    foreign = [n for n in entries if n not in RUN_OUTPUTS and not is_temporary(n)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(f"run directory {out} holds files a run does not write ({shown}); --overwrite replaces "
                          f"only an earlier run's outputs: move those files away or give another --out")
    if "config.yaml" not in entries and "metrics.jsonl" not in entries:
        raise ConfigError(f"run directory {out} is not an earlier run's directory (no config.yaml or metrics.jsonl); "
                          f"--overwrite replaces only an earlier run's outputs: give another --out")


def clear_run_outputs(out: Path) -> None:
    """Remove an earlier run's outputs from ``out`` (checked by :func:`check_run_dir`), nothing else."""
    if not out.is_dir():
        return
    for p in out.iterdir():
        if p.name in RUN_OUTPUTS or is_temporary(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


class RunWriter:
    """Writes the run directory. Only the main rank makes one; other ranks pass ``enabled=False``."""

    def __init__(self, out_dir: Path, source_names: list, enabled: bool = True):
        self.out_dir = Path(out_dir)
        self.source_names = list(source_names)
        self.enabled = enabled
        self.trajectory: list = []  # (step, [pi...]) pairs, pi *used* at that step
        self._metrics = None
        if enabled:
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                self._metrics = open(self.out_dir / "metrics.jsonl", "w", encoding="utf-8")
            except OSError as exc:
                raise write_error(self.out_dir / "metrics.jsonl", exc) from None

    def write_config(self, resolved: dict) -> None:
        if self.enabled:
            atomic_write(self.out_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))

    def write_json(self, name: str, obj) -> None:
        if self.enabled:
            atomic_write(self.out_dir / name, json.dumps(obj, indent=2) + "\n")

    def step(self, record: dict) -> None:
        self.trajectory.append((record["step"], [record["pi"][n] for n in self.source_names]))
        if self.enabled:
            try:
                self._metrics.write(json.dumps(record) + "\n")
                self._metrics.flush()
            except OSError as exc:
                raise write_error(self.out_dir / "metrics.jsonl", exc) from None

    def finish(self, final_step: int, final_pi: list, extra: dict | None = None) -> None:
        """weights.json (final pi by source name), pi.csv and pi.png."""
        self.trajectory.append((final_step, list(final_pi)))
        if not self.enabled:
            return
        try:
            self._metrics.close()
        except OSError as exc:
            raise write_error(self.out_dir / "metrics.jsonl", exc) from None
        weights = {n: float(p) for n, p in zip(self.source_names, final_pi)}
        atomic_write(self.out_dir / "weights.json", json.dumps(weights, indent=2) + "\n")
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["step"] + self.source_names)
        for step, pi in self.trajectory:
            w.writerow([step] + [f"{p:.8g}" for p in pi])
        atomic_write(self.out_dir / "pi.csv", buf.getvalue())
        self.plot(self.out_dir / "pi.png", extra or {})

    def plot(self, path: Path, extra: dict) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [s for s, _ in self.trajectory]
        val = extra.get("val_loss")
        fig, axes = plt.subplots(1, 2 if val else 1, figsize=(11 if val else 6.5, 4), squeeze=False)
        ax = axes[0][0]
        for i, name in enumerate(self.source_names):
            ax.plot(steps, [pi[i] for _, pi in self.trajectory], label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("source weight $\\pi$")
        ax.set_ylim(0, 1)
        ax.set_title("learned source weights")
        ax.legend(loc="best", fontsize="small")
        ax.grid(alpha=0.3)
        if val:
            ax = axes[0][1]
            ax.plot(val[0], val[1], color="black", lw=1)
            ax.set_xlabel("step")
            ax.set_ylabel("validation loss of w")
            ax.set_title("validation loss")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = _tmp_name(path, ".png")
        try:
            fig.savefig(tmp, dpi=110)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise write_error(path, exc) from None
        finally:
            plt.close(fig)

    def close(self) -> None:
        if self._metrics is not None and not self._metrics.closed:
            try:
                self._metrics.close()
            except OSError:  # a full disk: the error that got us here is reported already
                pass


def column_labels(names: list, width: int = 12) -> list:
    """One label of at most ``width`` characters per name, all different (the console table's
    headers): the name when it fits, else its head and tail around ``~``, so names that share a
    long prefix stay apart; labels that still collide get the name's position (``#2``)."""
    tail = (width - 1) // 2
    labels = [n if len(n) <= width else f"{n[:width - 1 - tail]}~{n[len(n) - tail:]}" for n in names]
    while len(set(labels)) < len(labels):
        counts = {lab: labels.count(lab) for lab in labels}
        labels = [f"{lab[:width - len(str(i)) - 1]}#{i}" if counts[lab] > 1 else lab for i, lab in enumerate(labels)]
    return labels


def weights_table(source_names: list, initial: list, final: list, last: dict | None = None) -> str:
    """The table printed at the end of a run."""
    head = f"{'source':<20} {'initial pi':>10} {'final pi':>10}"
    keys = [k for k in ("loss_u", "loss_w") if k in (last or {})]  # a one-model solver has only w
    head += "".join(f" {'loss ' + k[-1]:>9}" for k in keys)
    lines = [head, "-" * len(head)]
    order = sorted(range(len(source_names)), key=lambda i: -final[i])
    for i in order:
        name = source_names[i]
        row = f"{name:<20} {initial[i]:>10.4f} {final[i]:>10.4f}"
        for k in keys:
            v = last[k].get(name)
            row += f" {v:>9.4f}" if v is not None else f" {'-':>9}"
        lines.append(row)
    return "\n".join(lines)


# keys of a metrics record that are not curves: the step itself, and the layer indices of a switch
_NOT_SCALARS = {"step", "trainable_layers"}


def scalars(record: dict, prefix: str = "") -> dict:
    """Every number of a metrics record as ``{name: float}``, nesting joined by ``/`` (``pi/clean``,
    ``loss_u/clean``) and lists of numbers by rank (``peak_memory_bytes/rank0``): what the logging
    plugins plot. None (a source absent from the batch) and booleans are left out."""
    out = {}
    for key, value in record.items():
        if not prefix and key in _NOT_SCALARS:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, list):
            out.update({f"{name}/rank{i}": float(v) for i, v in enumerate(value)
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


# --------------------------------------------------------------------------- run metadata


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(root: Path, *args) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_commit() -> dict:
    """The git commit of the scalebio checkout this code runs from (an editable install), with
    whether it has uncommitted changes; empty for an installed wheel. The checkout must be the
    repository itself: a wheel installed in a virtual environment inside some other repository
    does not count."""
    root = Path(__file__).resolve().parents[1]
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:
        return {}
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return {}
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(dirty)}


def run_metadata(backend) -> dict:
    """What config.yaml records about the software and the machine of a run (after the backend's
    setup): versions, the scalebio commit when there is one, the world size, the device type,
    the backend's parallel layout, and how peak memory is measured."""
    import torch.distributed as dist

    from . import __version__

    device = backend.device.type
    layout = backend.layout
    if dataclasses.is_dataclass(layout):
        layout = dataclasses.asdict(layout)
    return {
        "versions": {"scalebio": __version__, "torch": _version("torch"), "megatron-core": _version("megatron-core"),
                     "transformer-engine": _version("transformer-engine") or _version("transformer_engine"),
                     "python": sys.version.split()[0]},
        **source_commit(),
        "world_size": dist.get_world_size() if dist.is_available() and dist.is_initialized()
        else int(os.environ.get("WORLD_SIZE", "1")),
        "device": device,
        "layout": layout,
        "peak_memory": "torch.cuda.max_memory_allocated" if device == "cuda" else "peak RSS of the process",
    }


def peak_memory_bytes(device) -> int:
    """This rank's peak memory so far: CUDA bytes ever allocated at once on ``device``, or the
    process's peak resident set size."""
    import torch

    if getattr(device, "type", device) == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def step_resources(ctx, seconds: float) -> dict:
    """Throughput and memory of one step, for metrics.jsonl: ``tokens`` (positions of the step's
    training and validation batches, padding included, as Megatron counts them), ``tokens_per_s``,
    and ``peak_memory_bytes`` per rank (a collective: every rank calls it)."""
    cfg = ctx.config
    tokens = (cfg.run.global_batch + cfg.run.val_batch) * cfg.data.seq_length
    return {"tokens": tokens, "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "peak_memory_bytes": ctx.backend.all_gather_object(peak_memory_bytes(ctx.backend.device))}
