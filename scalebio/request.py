"""What a run is asked to do, checked before anything heavy starts: the configuration layers
(model, data, ``--config`` files, ``--set``), the plugin selection and their options, and for
``--resume`` the run directory's checkpoint. :mod:`.runner` runs what :func:`prepare` returns."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import __version__
from .checkpointing import (CheckpointError, ResumePoint, config_differences, latest_checkpoint, not_a_run_directory,
                            read_common)
from .config import CORE_SECTIONS, ConfigError, Layers, RunConfig, find_model, load_yaml, parse_layers, to_dict
from .data import DataError
from .plugins import Plugins, override
from .recipes import resolve as resolve_recipe
from .roles import options_dict


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
        plugins = Plugins(override(config.plugins, req.plugins, infos), infos=infos)
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
