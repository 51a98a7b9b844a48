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
from pathlib import Path
from typing import Optional

from .checkpointing import (CHECKPOINTS, CheckpointError, Preempted, StopSignals, remove_stale, restore,
                            resume_command, save_checkpoint)
from .config import ConfigError, RunConfig
from .data import RunData
from .outputs import (RunWriter, check_run_dir, clear_run_outputs, column_labels, run_metadata, step_resources,
                      weights_table)
from .nonfinite import count_skip, trailing_skips
from .request import Prepared, RunRequest, prepare, resolved_config
from .roles import MODELS, NonFiniteError, RunContext
from .tokenizer import load_tokenizer


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

