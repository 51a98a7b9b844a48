"""The run: configuration -> plugins -> data -> backend -> steps -> outputs.

Everything heavy (process groups, models) starts only after the configuration, the plugin
selection, every plugin's options, the layout and the data have been checked.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import __version__
from .checkpointing import (CHECKPOINTS, CheckpointError, Preempted, ResumePoint, StopSignals, config_differences,
                            latest_checkpoint, not_a_run_directory, read_common, remove_stale, restore,
                            resume_command, save_checkpoint)
from .config import CORE_SECTIONS, ConfigError, Layers, RunConfig, find_model, load_yaml, parse_layers, to_dict
from .data import DataError, RunData
from .outputs import (RunWriter, check_run_dir, clear_run_outputs, column_labels, run_metadata, step_resources,
                      weights_table)
from .nonfinite import count_skip, trailing_skips
from .plugins import Plugins
from .recipes import resolve as resolve_recipe
from .roles import MODELS, NonFiniteError, RunContext, options_dict
from .tokenizer import load_tokenizer

DEMO_DIR = Path(__file__).resolve().parent / "demo"


@dataclass
class RunRequest:
    """What the command line asks for. Anything unset falls back to the embedded demo."""

    model: Optional[str] = None
    data: Optional[str] = None
    configs: tuple = ()
    sets: tuple = ()
    plugins: tuple = ()
    steps: Optional[int] = None
    out: Optional[str] = None
    seed: Optional[int] = None
    overwrite: bool = False
    # parallel layout shorthands, applied to the selected backend's options
    tp: Optional[int] = None
    pp: Optional[int] = None
    vpp: Optional[int] = None
    load: Optional[str] = None  # a scalebio checkpoint: its model.yaml and tokenizer are the defaults
    resume: Optional[str] = None  # a run directory to continue from its latest checkpoint
    save_every: Optional[int] = None


@dataclass
class Prepared:
    config: RunConfig
    plugins: Plugins
    classes: dict  # role -> class
    options: dict  # role -> parsed Options
    demo: bool
    resume: Optional[ResumePoint] = None


def build_layers(req: RunRequest) -> tuple:
    layers = Layers()
    demo = req.data is None
    if req.load is not None and not Path(req.load).is_dir():
        what = "is a file, not a checkpoint directory" if Path(req.load).exists() else "does not exist"
        raise ConfigError(f"--load {req.load}: the path {what} (give a directory written by tools/convert.py "
                          f"hf-to-megatron or by run.save_final)")
    if req.model is None and req.load is not None:
        model_path = Path(req.load) / "model.yaml"  # the checkpoint's own architecture
        if not model_path.is_file():
            raise ConfigError(f"--load {req.load}: no model.yaml there (convert a Hugging Face model with "
                              f"scalebio convert hf-to-megatron)")
    else:
        model_path = find_model(req.model or "tiny")
    layers.add_file(model_path, "model")
    if "name" not in layers.data["model"]:
        layers.add({"name": model_path.stem}, str(model_path), ("model",))
    # a model's suggested settings (layout, LISA gamma, micro-batch) sit below everything the user gives
    defaults = layers.data["model"].pop("defaults", None) or {}
    if not isinstance(defaults, dict) or "model" in defaults:
        raise ConfigError(f"{model_path}: 'defaults' maps sections (run, optim, data, plugin names) to settings")
    for section, values in defaults.items():
        layers.add({section: values}, f"{model_path} (defaults)")
    if demo:
        layers.add_file(DEMO_DIR / "run.yaml")
        layers.add_file(DEMO_DIR / "data.yaml", "data")
    else:
        layers.add_file(req.data, "data")
    if req.load is not None:
        layers.add({"run": {"load": str(Path(req.load).resolve())}}, f"--load {req.load}")
        if not layers.data["data"].get("tokenizer"):  # the checkpoint's own tokenizer files
            layers.add({"tokenizer": {"path": str(req.load)}}, f"--load {req.load}", ("data",))
    for path in req.configs:  # a file, or the name of a shipped recipe (scalebio/recipes/)
        layers.add_file(resolve_recipe(path))
    _add_flags(layers, req)
    return layers, demo


def _add_flags(layers: Layers, req: RunRequest) -> None:
    for flag, key in ((req.steps, "steps"), (req.out, "out"), (req.seed, "seed"), (req.save_every, "save_every")):
        if flag is not None:
            layers.add({"run": {key: flag}}, f"--{key.replace('_', '-')} {flag}")
    for assignment in req.sets:
        layers.add_override(assignment)


def resume_layers(req: RunRequest) -> Layers:
    """The configuration of a run directory (its config.yaml), then the flags given with --resume."""
    run_dir = Path(req.resume)
    given = [flag for flag, value in (("--model", req.model), ("--data", req.data), ("--config", req.configs),
                                      ("--load", req.load), ("--out", req.out), ("--overwrite", req.overwrite))
             if value]
    if given:
        raise ConfigError(f"--resume {run_dir} continues that run with its own configuration ({run_dir / 'config.yaml'}); "
                          f"{given[0]} cannot be given with it (--steps may extend the run, --tp/--pp/--vpp or "
                          f"--set may change the parallel layout, and --plugins may name observers)")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(not_a_run_directory(run_dir))
    saved = load_yaml(path)
    chosen = saved.get("plugins")
    if not isinstance(chosen, dict):
        raise CheckpointError(f"{path}: 'plugins' must map roles to plugin names, as a run writes it")
    names = [n for role, n in chosen.items() if role != "observers"] + list(chosen.get("observers") or [])
    # the sections a run reads; anything else in config.yaml is information about the run
    keep = set(CORE_SECTIONS) | set(names)
    layers = Layers()
    layers.add({**{k: v for k, v in saved.items() if k in keep}, "plugins": names}, str(path))
    _add_flags(layers, req)
    return layers


def check_resume(req: RunRequest, p: Prepared, say=print) -> ResumePoint:
    """The latest complete checkpoint of ``req.resume``, after checking that the configuration
    differs from the saved run's only in run.steps (which may grow) and the parallel layout."""
    run_dir = Path(req.resume)
    step, path = latest_checkpoint(run_dir, say)
    common = read_common(path)
    backend = p.classes["backend"]
    # observers do not change the numbers; the layout changes them only by rounding; what to do at
    # a non-finite step changes nothing until one happens (a stopped run may go on with skip)
    allowed = ({("run", "steps"), ("plugins", "observers"), ("run", "on_nonfinite"), ("run", "max_skips")}
               | {(backend.plugin_name, key) for key in backend.layout_options})
    now, saved = resolved_config(p), common["config"]
    names = sorted({v for k, v in now["plugins"].items() if k != "observers"}
                   | {v for k, v in saved.get("plugins", {}).items() if k != "observers"})
    diff = config_differences(saved, now, list(CORE_SECTIONS) + names, allowed)
    if diff:
        key, old, new = diff[0]
        more = f" (and {len(diff) - 1} more: {', '.join(d[0] for d in diff[1:4])})" if len(diff) > 1 else ""
        where = p.config.layers.where(tuple(key.split(".")))
        raise ConfigError(f"--resume {run_dir}: {key} is {new!r} here ({where}) but {old!r} in the run that wrote "
                          f"{path}{more}. A resumed run takes its configuration from the run; only run.steps and the "
                          f"parallel layout may change")
    steps = p.config.run.steps
    if steps < step:
        raise ConfigError(f"--resume {run_dir}: run.steps={steps} ({p.config.layers.where(('run', 'steps'))}) is below "
                          f"the {step} steps its latest checkpoint {path} has done")
    if steps != common["schedule_steps"]:
        say(f"note: the run now has {steps} steps (it had {common['schedule_steps']}); the learning-rate schedule "
            f"(warmup and decay over run.steps) changes from step {step} on")
    return ResumePoint(path, step, common)


def prepare(req: RunRequest, plugins: Optional[Plugins] = None) -> Prepared:
    """Check everything that can be checked without building a model."""
    if req.resume is not None:
        layers, demo = resume_layers(req), False
    else:
        layers, demo = build_layers(req)
    if plugins is None:
        from .plugins import discover

        infos = discover()
    else:
        infos = plugins.infos
    config = parse_layers(layers, set(infos))
    if plugins is None:
        plugins = Plugins(list(config.plugins) + list(req.plugins), infos=infos)
    layout = {key: value for key, value in (("tp", req.tp), ("pp", req.pp), ("vpp", req.vpp)) if value is not None}
    if layout:
        flags = " ".join(f"--{k} {v}" for k, v in layout.items())
        layers.add({plugins.selected["backend"]: layout}, flags)
        config = parse_layers(layers, set(infos))
    classes = {role: plugins.role_class(role) for role in plugins.selected}
    options = {role: config.plugin_options(cls.plugin_name, cls.Options) for role, cls in classes.items()}
    _check_solver_data(config, classes["solver"])
    # sections of installed plugins not in this run are still checked, so a typo is not ignored
    for name, section in config.sections.items():
        if name in plugins.selected.values():
            continue
        info = plugins.infos[name]
        if info.error is None and info.roles:
            cls = getattr(info.plugin, f"scalebio_{info.roles[0]}")()
            config.plugin_options(name, cls.Options)
    prepared = Prepared(config, plugins, classes, options, demo)
    if req.resume is not None:
        say = print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a: None)
        prepared.resume = check_resume(req, prepared, say)
    return prepared


def _check_solver_data(cfg: RunConfig, solver) -> None:
    """What the solver needs of the data: a validation set, a sampling mode it accepts."""
    name = solver.plugin_name
    if cfg.data.validation is None and solver.needs_validation:
        raise DataError(f"data.validation is not set: the {name} solver needs a validation set")
    if cfg.data.sampling not in solver.sampling:
        raise ConfigError(f"{cfg.layers.where(('data', 'sampling'))}: data.sampling={cfg.data.sampling} does not "
                          f"work with the {name} solver; it accepts {', '.join(solver.sampling)}")


def resolved_config(p: Prepared) -> dict:
    cfg = p.config
    out = {"scalebio_version": __version__,
           "plugins": {**p.plugins.selected, "observers": list(p.plugins.observers)},
           "run": to_dict(cfg.run), "optim": to_dict(cfg.optim),
           "model": to_dict(cfg.model), "data": to_dict(cfg.data)}
    for role, opts in p.options.items():
        out[p.classes[role].plugin_name] = options_dict(opts)
    return out


def _out_dir(cfg: RunConfig, overwrite: bool) -> Path:
    """The run directory, checked (writable, new or an earlier run's) before anything is read or
    built; nothing is removed yet (see clear_run_outputs)."""
    out = Path(cfg.run.out.format(model=cfg.model.name, time=time.strftime("%Y%m%d-%H%M%S")))
    check_run_dir(out, overwrite)
    return out


@contextmanager
def open_run(p: Prepared, overwrite: bool = False, verbose: bool = True, models=MODELS):
    """Tokenizer, data, backend (set up with ``models``), weights, layer selection and solver of a
    prepared run. Yields ``(ctx, data)``; the backend (process groups, models) is closed on exit.
    A resumed run (``p.resume``) opens its own run directory; its state is restored by the caller.
    """
    cfg = p.config
    main = int(os.environ.get("RANK", "0")) == 0
    say = verbose and main
    names = sorted(cfg.data.sources)  # source ids: positions in sorted order (scalebio.data)
    ctx = RunContext(config=cfg, source_names=names, out_dir=None, hooks=p.plugins.hook,
                     resume_from=p.resume.path if p.resume is not None else None)
    out_dir = None
    if main:  # a resumed run continues in its own directory; a new one checks --out before anything heavy
        out_dir = p.resume.path.parent.parent if p.resume is not None else _out_dir(cfg, overwrite)
    # the backend checks layout, checkpoint and memory before any data is read; it builds nothing yet
    ctx.backend = p.classes["backend"](p.options["backend"], ctx)
    # cheap roles first, so that their checks (lisa.gamma against the layers, say) come before the data
    ctx.weights = p.classes["weights"](p.options["weights"], names)
    ctx.layers = p.classes["layer_selection"](p.options["layer_selection"], ctx.backend.num_layers, cfg.run.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                          f"{cfg.model.vocab_size} ({cfg.layers.where(('model', 'vocab_size'))})")
    data = RunData(cfg.data, tokenizer, cfg.run.seed, global_batch=cfg.run.global_batch,
                   progress=say and cfg.run.progress, sampling_probs=ctx.weights.probs)
    assert data.source_names == names
    if main and overwrite and p.resume is None:
        clear_run_outputs(out_dir)  # only now that the run is known to start
    ctx.data = data
    if main:
        if cfg.run.save_every or p.resume is not None:  # checkpoints will be written here: fail now, not at step N
            try:
                (out_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CheckpointError(f"cannot create {out_dir / CHECKPOINTS} for checkpoints: {exc.strerror}; "
                                      f"choose another --out") from None
            remove_stale(out_dir, print if say else (lambda *a: None))
    if say and p.demo:
        print("No --data given: running the embedded demo (tiny Qwen2-style model, sources made from "
              "Python's documentation, two of them corrupted).")
    if say:
        print("plugins: " + ", ".join(f"{r.replace('_', ' ')}={n}" for r, n in p.plugins.selected.items()))
        for line in data.summary():
            print("  data  " + line, flush=True)
        for line in cfg.warnings:
            print(line, flush=True)
    try:
        ctx.backend.setup(models)
        # every rank must agree on the directory (checkpoints are written by all of them)
        ctx.out_dir = Path(ctx.backend.broadcast_object(str(out_dir) if main else None))
        ctx.solver = p.classes["solver"](p.options["solver"], ctx)
        yield ctx, data
    finally:
        ctx.backend.close()


def execute(p: Prepared, overwrite: bool = False) -> dict:
    point = p.resume
    with open_run(p, overwrite, models=p.classes["solver"].models) as (ctx, data):
        start = restore(ctx, data, point) if point is not None else 0
        if point is not None and ctx.is_main:
            print(f"resuming {ctx.out_dir} from {point.path.name}: {start} of {ctx.config.run.steps} steps done, "
                  f"continuing at step {start}", flush=True)
        writer = RunWriter(ctx.out_dir, ctx.source_names, enabled=ctx.is_main,
                           resume_step=start if point is not None else None)
        try:
            resolved = {**resolved_config(p), "metadata": run_metadata(ctx.backend)}
            writer.write_config(resolved)
            ctx.hooks.scalebio_run_start(run=ctx, config=resolved)
            kept = ctx.backend.broadcast_object(writer.kept if ctx.is_main else None) if point is not None else []
            return _loop(ctx, data, writer, resolved, start, kept)
        finally:
            writer.close()


def _loop(ctx: RunContext, data: RunData, writer: RunWriter, resolved: dict, start: int = 0,
          records: Optional[list] = None) -> dict:
    cfg, backend, names = ctx.config, ctx.backend, ctx.source_names
    main = ctx.is_main
    records = list(records or [])
    skips = trailing_skips(records)  # consecutive skipped steps, counted across a resume
    records = [r for r in records if "skipped" not in r]
    initial = [records[0]["pi"][n] for n in names] if records else ctx.weights.probs().tolist()
    every, keep = cfg.run.save_every, cfg.run.keep_checkpoints
    saved = start if ctx.resume_from is not None else None  # the step of the latest checkpoint on disk
    bar = None
    if main and cfg.run.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.run.steps, initial=start, desc="scalebio", unit="step", dynamic_ncols=True,
                   file=sys.stderr)
    log = bar.write if bar is not None else print
    if main:
        log(f"{'step':>6} {'val loss':>9}  " + "  ".join(f"{n:>12}" for n in column_labels(names, 12)))
    try:
        with StopSignals() as signals:
            for step in range(start, cfg.run.steps):
                t0 = time.perf_counter()
                selection, changed = ctx.layers.select(step)
                if changed:
                    for m in ctx.solver.models:
                        backend.set_trainable(m, selection.layers[m], selection.keep_state)
                pi = ctx.weights.probs().tolist()
                try:
                    metrics = ctx.solver.step(step, data.next_train(cfg.run.global_batch),
                                              data.next_val(cfg.run.val_batch))
                except NonFiniteError as exc:  # raised before any update: nothing to undo
                    skips = count_skip(cfg.run, exc, step, skips)
                    writer.step({"step": step, "pi": dict(zip(names, pi)), "skipped": str(exc),
                                 "skipped_in_a_row": skips, "time_s": time.perf_counter() - t0})
                    if main:
                        log(f"{step:>6} skipped ({skips} in a row, run.max_skips={cfg.run.max_skips}): {exc}")
                    if bar is not None:
                        bar.update(1)
                else:
                    skips = 0
                    record = {"step": step, "pi": dict(zip(names, pi)), **metrics, "time_s": time.perf_counter() - t0}
                    record.update(step_resources(ctx, record["time_s"]))
                    if changed:
                        record["trainable_layers"] = {m: sorted(selection.layers[m]) for m in ctx.solver.models}
                    records.append(record)
                    writer.step(record)
                    ctx.hooks.scalebio_step_end(run=ctx, step=step, metrics=record)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(val_loss=f"{record['val_loss']:.3f}")
                    if main and (step % cfg.run.log_every == 0 or step == cfg.run.steps - 1):
                        log(f"{step:>6} {record['val_loss']:>9.4f}  " + "  ".join(f"{p:>12.4f}" for p in pi))
                done = step + 1
                if every and (done % every == 0 or done == cfg.run.steps):  # periodic, and the final one
                    save_checkpoint(ctx, data, done, resolved, "final" if done == cfg.run.steps else "periodic", keep)
                    saved = done
                # every rank stops at the same step, whichever ranks the signal reached
                if done < cfg.run.steps:
                    received = [s for s in backend.all_gather_object(signals.received) if s]
                    if received:
                        _stop(ctx, data, writer, resolved, records, done, saved != done, received[0])
    finally:
        if bar is not None:
            bar.close()
    final = ctx.weights.output().tolist()
    tail = records[-max(1, len(records) // 10):]
    last = {key: {n: _mean([r[key][n] for r in tail]) for n in names} for key in ("loss_u", "loss_w")
            if all(key in r for r in tail)}  # a one-model solver reports only w
    writer.finish(cfg.run.steps, final, {"val_loss": ([r["step"] for r in records],
                                                      [r["val_loss"] for r in records])})
    if cfg.run.save_final:
        _save_final(ctx)
    test = None
    if data.test is not None:  # the held-out test set, scored once with the final w
        from .scoring import evaluate_sets

        test = evaluate_sets(ctx, data, "w", sets=[("test", data.test)])["test"]
        writer.write_json("test.json", test)
    if main:
        if test is not None:
            print(f"\ntest set: token-mean loss of w {test['loss']:.4f} (perplexity {test['perplexity']:.2f}) "
                  f"over {test['tokens']} tokens")
        heading = "Learned source weights" if ctx.weights.learns else "Source weights (fixed, not learned)"
        print(f"\n{heading} after {cfg.run.steps} steps (losses: mean of the last "
              f"{len(tail)} steps):")
        print(weights_table(names, initial, final, last))
        print(f"\nrun directory: {ctx.out_dir}  (weights.json, metrics.jsonl, pi.csv, pi.png, config.yaml)")
    result = {"weights": dict(zip(names, final)), "steps": cfg.run.steps, "out_dir": str(ctx.out_dir),
              "initial": dict(zip(names, initial)), "last": last, "test": test}
    ctx.hooks.scalebio_run_end(run=ctx, result=result)
    return result


def _stop(ctx, data, writer, resolved, records, done: int, save: bool, signum: int) -> None:
    """A signal stopped the run after ``done`` steps: checkpoint, outputs of the steps done, exit."""
    import signal

    cfg = ctx.config
    if save:
        path = save_checkpoint(ctx, data, done, resolved, "signal", cfg.run.keep_checkpoints)
    else:
        path = ctx.out_dir / CHECKPOINTS / f"step-{done:08d}"
    command = resume_command(ctx.out_dir)
    writer.finish(done, ctx.weights.probs().tolist(),
                  {"val_loss": ([r["step"] for r in records], [r["val_loss"] for r in records])},
                  partial={"steps_done": done, "steps": cfg.run.steps, "checkpoint": str(path), "resume": command})
    name = signal.Signals(signum).name
    raise Preempted(f"stopped by {name} after {done} of {cfg.run.steps} steps; checkpoint {path}. weights.json, pi.csv "
                    f"and pi.png in {ctx.out_dir} hold the steps done (partial.json marks them partial). Resume "
                    f"with: {command}")


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _save_final(ctx: RunContext) -> None:
    """u and w under out/final, written to a temporary directory first and renamed when complete."""
    final = ctx.out_dir / "final"
    tmp = ctx.out_dir / "final.partial"
    if ctx.is_main and tmp.exists():
        shutil.rmtree(tmp)
    ctx.backend.barrier()
    for m in ctx.solver.models:
        ctx.backend.save_model(m, tmp / m)
    ctx.backend.barrier()
    if ctx.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    ctx.backend.barrier()
    ctx.hooks.scalebio_checkpoint_saved(run=ctx, step=ctx.config.run.steps, path=str(final))


def run(req: RunRequest) -> dict:
    return execute(prepare(req), overwrite=req.overwrite)

