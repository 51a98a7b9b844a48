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
import subprocess
import sys
from pathlib import Path

import yaml


def atomic_write(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


PARTIAL = "partial.json"  # beside outputs written for the steps done by a run that was stopped


def read_metrics(path: Path) -> list:
    """The records of a metrics.jsonl; a last line cut short by a kill is dropped."""
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class RunWriter:
    """Writes the run directory. Only the main rank makes one; other ranks pass ``enabled=False``.

    ``resume_step``: continue a run directory from a checkpoint of that many steps. Rows of
    metrics.jsonl from later steps (written after the checkpoint, before the run stopped) are
    dropped, the others kept in ``self.kept`` and in the pi trajectory, and new rows appended.
    """

    def __init__(self, out_dir: Path, source_names: list, enabled: bool = True, resume_step: int | None = None):
        self.out_dir = Path(out_dir)
        self.source_names = list(source_names)
        self.enabled = enabled
        self.trajectory: list = []  # (step, [pi...]) pairs, pi *used* at that step
        self.kept: list = []  # the step records kept from before a resume
        self._metrics = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "metrics.jsonl"
        if resume_step is None:
            self._metrics = open(path, "w", encoding="utf-8")
            return
        # rows without a step (run metadata) stay; step rows up to the checkpoint stay
        rows = [r for r in read_metrics(path) if not isinstance(r.get("step"), int) or r["step"] < resume_step]
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
        self.kept = [r for r in rows if isinstance(r.get("step"), int)]
        self.trajectory = [(r["step"], [r["pi"][n] for n in self.source_names]) for r in self.kept]
        self._metrics = open(path, "a", encoding="utf-8")

    def write_config(self, resolved: dict) -> None:
        if self.enabled:
            atomic_write(self.out_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))

    def write_json(self, name: str, obj) -> None:
        if self.enabled:
            atomic_write(self.out_dir / name, json.dumps(obj, indent=2) + "\n")

    def step(self, record: dict) -> None:
        self.trajectory.append((record["step"], [record["pi"][n] for n in self.source_names]))
        if self.enabled:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def finish(self, final_step: int, final_pi: list, extra: dict | None = None, partial: dict | None = None) -> None:
        """weights.json (final pi by source name), pi.csv and pi.png.

        ``partial``: the run stopped before its last step; these outputs are for the steps done,
        and ``partial.json`` (holding ``partial``) says so until a resumed run finishes.
        """
        self.trajectory.append((final_step, list(final_pi)))
        if not self.enabled:
            return
        self._metrics.close()
        if partial is not None:
            atomic_write(self.out_dir / PARTIAL, json.dumps({"partial": True, **partial}, indent=2) + "\n")
        else:
            (self.out_dir / PARTIAL).unlink(missing_ok=True)
        weights = {n: float(p) for n, p in zip(self.source_names, final_pi)}
        atomic_write(self.out_dir / "weights.json", json.dumps(weights, indent=2) + "\n")
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["step"] + self.source_names)
        for step, pi in self.trajectory:
            w.writerow([step] + [f"{p:.8g}" for p in pi])
        atomic_write(self.out_dir / "pi.csv", buf.getvalue())
        title = None if partial is None else f"partial: {final_step} of {partial['steps']} steps"
        self.plot(self.out_dir / "pi.png", extra or {}, title)

    def plot(self, path: Path, extra: dict, note: str | None = None) -> None:
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
        ax.set_title("learned source weights" + (f" ({note})" if note else ""))
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
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, path)

    def close(self) -> None:
        if self._metrics is not None and not self._metrics.closed:
            self._metrics.close()


def weights_table(source_names: list, initial: list, final: list, last: dict | None = None) -> str:
    """The table printed at the end of a run."""
    head = f"{'source':<20} {'initial pi':>10} {'final pi':>10}"
    if last:
        head += f" {'loss u':>9} {'loss w':>9}"
    lines = [head, "-" * len(head)]
    order = sorted(range(len(source_names)), key=lambda i: -final[i])
    for i in order:
        name = source_names[i]
        row = f"{name:<20} {initial[i]:>10.4f} {final[i]:>10.4f}"
        if last:
            lu, lw = last["loss_u"].get(name), last["loss_w"].get(name)
            row += f" {lu:>9.4f}" if lu is not None else f" {'-':>9}"
            row += f" {lw:>9.4f}" if lw is not None else f" {'-':>9}"
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
