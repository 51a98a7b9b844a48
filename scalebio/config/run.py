"""The ``run:`` and ``optim:`` sections, and the whole run configuration built from the layers."""
from __future__ import annotations

import difflib
import math
import string
from dataclasses import dataclass, field
from typing import Literal, Optional

from .data import DataConfig
from .layers import ConfigError, Layers, _coerce, field_aliases, parse
from .model import ModelConfig


@dataclass
class RunOptions:
    """``run:`` the loop. Defaults follow the authors' scripts (SPEC §2)."""

    steps: int = 1000
    seed: int = 1234
    out: str = "runs/scalebio"
    global_batch: int = 128  # training samples per step, over all micro-batches and data-parallel ranks
    micro_batch: int = 8  # samples per forward pass on one rank
    val_batch: int = 64  # fresh validation samples per step
    log_every: int = 10  # console table every N steps (metrics.jsonl gets every step)
    progress: bool = True
    save_final: bool = False  # write the final w (and u) under out/final
    load: Optional[str] = None  # a scalebio checkpoint directory (tools/convert.py); u and w start from it
    save_every: int = 0  # a resumable checkpoint every N steps and at the end; 0 = only when stopped by a signal
    keep_checkpoints: int = 2  # the latest K resumable checkpoints are kept
    # a NaN or inf loss or gradient norm: stop (exit code 3), or skip the step's updates; skips past
    # max_skips in a row stop the run as well (docs/configuration.md)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skips: int = 3

    def validate(self):
        for name in ("steps", "global_batch", "micro_batch", "val_batch", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"run.{name} must be at least 1, got {getattr(self, name)}", keys=(name,))
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"run.seed must be in [0, 2**32), got {self.seed}", keys=("seed",))
        if self.save_every < 0:
            raise ConfigError(f"run.save_every must be >= 0 (0: no periodic checkpoints), got {self.save_every}",
                              keys=("save_every",))
        if self.max_skips < 1:
            raise ConfigError(f"run.max_skips must be at least 1 (consecutive non-finite steps run.on_nonfinite=skip "
                              f"skips before it stops), got {self.max_skips}", keys=("max_skips",))
        check_out_template(self.out)


OUT_PLACEHOLDERS = ("model", "time")


def check_out_template(out: str) -> None:
    """``run.out`` may use ``{model}`` and ``{time}``; anything else in braces is an error here, not
    a KeyError when the run directory is made."""
    if not out.strip():
        raise ConfigError("run.out is empty: give a run directory", keys=("out",))
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(out) if name is not None]
    except ValueError as exc:
        raise ConfigError(f"run.out {out!r}: {exc}; the placeholders are {{model}} and {{time}}, and a literal "
                          f"brace is written twice ({{{{ or }}}})", keys=("out",)) from None
    unknown = [n for n in names if n not in OUT_PLACEHOLDERS]
    if unknown:
        raise ConfigError(f"run.out {out!r}: unknown placeholder {{{unknown[0]}}}; the placeholders are {{model}} and "
                          f"{{time}} (a literal brace is written twice: {{{{ or }}}})", keys=("out",))


@dataclass
class OptimOptions:
    """``optim:`` AdamW for u and w, and the schedule shared by all three learning rates."""

    lr: float = 1e-5  # lr_u = lr_w unless set apart
    lr_u: Optional[float] = None
    lr_w: Optional[float] = None
    weight_decay: float = 5e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # on the unscaled gradients: of L2(u) for u, of L1 + alpha*L2 for w; 0 = off
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: float = 0.03  # fraction of the steps with linear warmup
    min_lr_ratio: float = 0.0  # the schedule decays to lr * min_lr_ratio

    def validate(self):
        for name in ("lr", "lr_u", "lr_w", "weight_decay", "adam_eps", "clip_grad", "warmup", "min_lr_ratio",
                     "adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"optim.{name} must be a finite number, got {value}", keys=(name,))
        for name in ("lr", "lr_u", "lr_w", "weight_decay"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"optim.{name} must be >= 0, got {value}", keys=(name,))
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}", keys=(name,))
        if self.adam_eps <= 0:
            raise ConfigError(f"optim.adam_eps must be positive, got {self.adam_eps}", keys=("adam_eps",))
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"optim.warmup is a fraction of the steps in [0, 1), got {self.warmup}", keys=("warmup",))
        if self.clip_grad < 0:
            raise ConfigError(f"optim.clip_grad must be >= 0, got {self.clip_grad}", keys=("clip_grad",))
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}", keys=("min_lr_ratio",))

    @property
    def lr_u_value(self) -> float:
        return self.lr if self.lr_u is None else self.lr_u

    @property
    def lr_w_value(self) -> float:
        return self.lr if self.lr_w is None else self.lr_w


CORE_SECTIONS = ("plugins", "run", "optim", "model", "data")


@dataclass
class RunConfig:
    run: RunOptions
    optim: OptimOptions
    model: ModelConfig
    data: DataConfig
    plugins: list  # names asked for (config file ``plugins:`` plus ``--plugins``)
    sections: dict  # raw plugin option sections by plugin name
    layers: Layers = field(repr=False, default=None)
    warnings: list = field(default_factory=list)  # shown with the data summary when the run opens

    def plugin_options(self, plugin_name: str, options_cls):
        """Parse the section named after a plugin into its Options dataclass."""
        section = self.sections.get(plugin_name)
        if isinstance(section, dict):
            section = dict(section)
        # an alias and its field set by different layers: the later layer wins (e.g. a user's
        # lisa_interval_steps over a model's suggested interval); in one layer both are an error
        for alias, name in field_aliases(options_cls).items():
            if isinstance(section, dict) and alias in section and name in section:
                ranks = [self.layers.rank.get((plugin_name, k), 0) for k in (alias, name)]
                if ranks[0] != ranks[1]:
                    section.pop(name if ranks[0] > ranks[1] else alias)
        return parse(options_cls, section, self.layers.where, (plugin_name,))


def parse_layers(layers: Layers, plugin_names) -> RunConfig:
    """Type-check merged layers. ``plugin_names`` are the installed plugins (valid sections)."""
    data = layers.data
    for key in data:
        if key not in CORE_SECTIONS and key not in plugin_names:
            known = list(CORE_SECTIONS) + sorted(plugin_names)
            hint = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{layers.where((key,))}: unknown section '{key}'{hint}; valid sections: "
                              f"{', '.join(CORE_SECTIONS)} and the plugin names {', '.join(sorted(plugin_names))}")
    plugins = data.get("plugins", [])
    if isinstance(plugins, str):
        plugins = [p.strip() for p in plugins.split(",")]
    plugins = _coerce(list[str], plugins, ("plugins",), layers.where)
    config = RunConfig(
        run=parse(RunOptions, data.get("run"), layers.where, ("run",)),
        optim=parse(OptimOptions, data.get("optim"), layers.where, ("optim",)),
        model=parse(ModelConfig, data.get("model"), layers.where, ("model",)),
        data=parse(DataConfig, data.get("data"), layers.where, ("data",)),
        plugins=plugins,
        sections={k: v for k, v in data.items() if k not in CORE_SECTIONS},
        layers=layers,
    )
    config.warnings += _check_sequence_length(config, layers)
    return config


def _check_sequence_length(config: RunConfig, layers: Layers) -> list:
    """Rows longer than the model's positions: an error with learned position embeddings (there is
    no embedding past the table), a warning with RoPE (it extrapolates, with no quality assured)."""
    seq, limit = config.data.seq_length, config.model.max_sequence_length
    if seq <= limit:
        return []
    where = (f"data.seq_length={seq} ({layers.origin_of(('data', 'seq_length'))}) exceeds model.max_sequence_length="
             f"{limit} ({layers.origin_of(('model', 'max_sequence_length'))})")
    if config.model.position_embedding_type == "learned_absolute":
        raise ConfigError(f"{where}, the size of the model's learned position embeddings; set data.seq_length to at "
                          f"most {limit}")
    return [f"warning: {where}, the length the model was trained for; RoPE extrapolates past it, but the model "
            f"has not seen such positions"]
