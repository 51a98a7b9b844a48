"""``scalebio compare``: learn weights, then fine-tune on them and on the baselines, and measure.

For one data YAML and model it runs, one after another and each as its own process (so every run
starts and ends its own process groups, and any layout works through ``--launcher torchrun ...``):

1. the bilevel run (``scalebio run``) -> ``bilevel/weights.json``;
2. one run of each weight-learning baseline (``--baselines``, default ``doremi``) -> its weights;
3. ``scalebio train`` on the learned weights, on each baseline's, on ``uniform`` and on
   ``natural``, each with ``--seeds`` seeds and the same number of steps and global batch (so the
   same number of training rows per arm);

then reads every train run's ``test.json`` and writes ``compare.json``, ``compare.png`` and the
table (:mod:`.report`). Everything each run will be asked is checked before the first one starts.
An arm whose weights equal uniform's (``natural`` when every source has as many samples) would
repeat uniform's runs row for row, so it is not run again: the report shows it as uniform's.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from ..config import ConfigError
from ..runner import RunRequest, prepare
from .train import TRAIN_PLUGINS, train_request

FIXED_ARMS = ("uniform", "natural")
SAME_WEIGHTS = 1e-12  # weights closer than this are the same arm


class CompareError(RuntimeError):
    """A run of the comparison failed; the message names it and its log."""


@dataclass
class CompareRequest:
    data: str
    model: Optional[str] = None
    load: Optional[str] = None
    plugins: tuple = ()  # every run (e.g. lisa); a plugin of a role an arm fills itself is left out there
    steps: Optional[int] = None  # the bilevel and baseline runs (default: the config's run.steps)
    train_steps: Optional[int] = None  # every train run (default: steps)
    seeds: int = 3
    seed: int = 1234
    baselines: tuple = ("doremi",)  # weight-learning solver plugins
    out: str = "runs/compare-{time}"
    configs: tuple = ()  # --config files of every run
    sets: tuple = ()  # --set of every run
    learn_sets: tuple = ()  # --set of the bilevel and baseline runs only
    train_sets: tuple = ()  # --set of the train runs only
    launcher: str = ""  # e.g. "torchrun --nproc-per-node 4"; default: this Python
    overwrite: bool = False


@dataclass
class Run:
    """One process of the comparison: a weight-learning run, or a train run of one arm and seed."""

    name: str
    arm: str  # "bilevel" or a baseline (weight learning); learned/<baseline>/uniform/natural (train)
    seed: int
    request: RunRequest
    weights: Optional[str] = None  # train runs: the --weights value
    result: dict = field(default_factory=dict)

    @property
    def is_train(self) -> bool:
        return self.weights is not None

    def argv(self) -> list:
        """The scalebio command line of this run (after ``scalebio``)."""
        r = self.request
        out = ["train", "--weights", self.weights] if self.is_train else ["run"]
        for flag, value in (("--model", r.model), ("--data", r.data), ("--load", r.load), ("--steps", r.steps),
                            ("--out", r.out), ("--seed", r.seed)):
            if value is not None:
                out += [flag, str(value)]
        if r.plugins:
            out += ["--plugins", ",".join(r.plugins)]
        for path in r.configs:
            out += ["--config", str(path)]
        for s in r.sets:
            out += ["--set", s]
        return out + (["--overwrite"] if r.overwrite else [])


def _keep_plugins(plugins, own, infos) -> tuple:
    """The user's plugins minus those of a role that ``own`` fills."""
    taken = {role for name in own if name in infos for role in infos[name].roles}
    return tuple(p for p in plugins if p not in infos or not set(infos[p].roles) & taken)


def plan(req: CompareRequest, out: Path, infos: dict) -> list:
    if req.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {req.seeds}")
    unknown = [b for b in req.baselines if b not in infos or "solver" not in infos[b].roles]
    if unknown:
        solvers = sorted(n for n, i in infos.items() if "solver" in i.roles and n not in ("minimax",) + TRAIN_PLUGINS)
        raise ConfigError(f"--baselines {','.join(unknown)}: not an installed weight-learning solver plugin "
                          f"(installed: {', '.join(solvers) or 'none'})")
    common = ("run.progress=false",) + tuple(req.sets)
    base = RunRequest(model=req.model, data=str(Path(req.data).resolve()), load=req.load, configs=req.configs,
                      overwrite=req.overwrite, seed=req.seed)
    runs = [Run("bilevel", "bilevel", req.seed, replace(base, plugins=tuple(req.plugins), steps=req.steps,
                                                         sets=common + req.learn_sets, out=str(out / "bilevel")))]
    for b in req.baselines:
        runs.append(Run(b, b, req.seed, replace(base, plugins=(b,) + _keep_plugins(req.plugins, (b,), infos),
                                                steps=req.steps, sets=common + req.learn_sets, out=str(out / b))))
    arms = {"learned": str(out / "bilevel"), **{b: str(out / b) for b in req.baselines},
            **{a: a for a in FIXED_ARMS}}
    train_plugins = _keep_plugins(req.plugins, TRAIN_PLUGINS, infos)
    # the comparison reads the test set only: no validation passes during or after training
    train_sets = common[:1] + ("train.val_every=0", "train.eval_samples=0") + common[1:] + tuple(req.train_sets)
    train_steps = req.train_steps if req.train_steps is not None else req.steps
    for i in range(req.seeds):
        seed = req.seed + i
        for arm, weights in arms.items():
            name = f"train-{arm}-s{seed}"
            runs.append(Run(name, arm, seed, replace(base, plugins=train_plugins, steps=train_steps, seed=seed,
                                                     sets=train_sets, out=str(out / name)), weights))
    return runs


def check(runs: list):
    """Prepare every run (config, plugins, options) before the first starts; the bilevel run's config."""
    first = None
    for run in runs:
        if run.is_train:  # the learned weights do not exist yet: check the run with uniform ones
            cfg = train_request(run.request, "uniform")[0].config
        else:
            cfg = prepare(run.request).config
        first = first or cfg
        if cfg.data.test is None:
            raise ConfigError(f"{run.request.data}: compare scores every arm on a held-out test set and this data "
                              f"has none; add 'test:' to it (docs/data.md)")
    return first


def same_as_uniform(runs: list) -> tuple:
    """(runs without the fixed arms whose weights equal uniform's, {arm: "uniform"} for those arms).

    The same weights and seed draw the same rows, so such an arm's runs would repeat uniform's."""
    first = {r.arm: r for r in reversed(runs) if r.is_train and r.arm in FIXED_ARMS}
    if "uniform" not in first:
        return runs, {}
    uniform = train_request(first["uniform"].request, "uniform")[1]
    same = {}
    for arm in FIXED_ARMS:
        if arm != "uniform" and arm in first:
            pi = train_request(first[arm].request, arm)[1]
            if max(abs(pi[n] - uniform[n]) for n in uniform) <= SAME_WEIGHTS:
                same[arm] = "uniform"
    return [r for r in runs if r.arm not in same], same


def launch(run: Run, launcher: list, log: Path) -> float:
    """Run one process; its output goes to ``log``. Returns the wall time."""
    cmd = launcher + ["-m", "scalebio"] + run.argv()
    run.result["command"] = cmd
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_child_env()).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        raise CompareError(f"run '{run.name}' failed (exit code {code}): {lines[-1] if lines else 'no output'}; "
                           f"full log: {log}")
    return seconds


def _child_env() -> dict:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # each run makes its own process group (or torchrun does)
    return env


def compare(req: CompareRequest, say=print) -> dict:
    from ..plugins import discover
    from . import report

    started = time.perf_counter()
    infos = discover()
    out = Path(req.out.format(time=time.strftime("%Y%m%d-%H%M%S"), model=req.model or "model"))
    if out.exists() and any(out.iterdir()) and not req.overwrite:
        raise ConfigError(f"compare directory {out} already exists and is not empty; give another --out or "
                          f"pass --overwrite")
    runs = plan(req, out, infos)
    cfg = check(runs)
    runs, same = same_as_uniform(runs)
    for arm in same:
        say(f"compare: '{arm}' weights equal uniform's (sources of the same size), so its runs would repeat "
            f"uniform's; it is reported as uniform's and not run")
    launcher = shlex.split(req.launcher) if req.launcher else [sys.executable]
    say(f"compare: {len(runs)} runs into {out} (logs in {out / 'logs'}); model {cfg.model.name}, "
        f"{len(runs) - 1 - len(req.baselines)} train runs of {runs[-1].request.steps or cfg.run.steps} steps")
    for i, run in enumerate(runs, 1):
        seconds = launch(run, launcher, out / "logs" / f"{run.name}.log")
        run.result.update(report.read_run(Path(run.request.out), run.is_train), seconds=seconds)
        what = (f"test loss {run.result['test']['loss']:.4f}" if run.is_train
                else "weights " + ", ".join(f"{n} {p:.3f}" for n, p in run.result["weights"].items()))
        say(f"[{i}/{len(runs)}] {run.name}: {what} ({seconds:.0f} s)")
    result = report.summarize(req, runs, cfg, same=same)
    result["seconds"] = time.perf_counter() - started  # the whole comparison, wall time
    report.write(out, result)
    say("\n" + report.table(result))
    say(f"\ncompare took {result['seconds'] / 60:.1f} min of wall time ({len(runs)} runs)")
    say(f"\ncompare directory: {out}  (compare.json, compare.png, one run directory per run, logs/)")
    return result
