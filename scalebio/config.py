"""Run configuration: typed dataclasses loaded from layered YAML with provenance.

Layers, lowest priority first: dataclass defaults, the model YAML (``model:``), the data YAML
(``data:``), ``--config`` files, ``--set section.key=value`` overrides. Every key is checked
against its dataclass; an unknown key is an error that names the key and the file (or the
``--set`` flag) it came from. Plugin option sections are named after the plugin (``lisa:``,
``minimax:``) and parsed into that plugin's ``Options`` dataclass once plugins are selected.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import string
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """Invalid configuration. The message names the key and where it came from.

    A ``validate()`` method may name the fields its error is about (``keys=("lr",)``); otherwise
    :func:`parse` takes the fields the message mentions. Either way the error is prefixed with
    where those keys were set (the file or flag of each), not where their section began."""

    def __init__(self, message: str = "", keys: tuple = ()):
        super().__init__(message)
        self.keys = tuple(keys)


# --------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path) -> dict:
    """Read a YAML mapping; parse errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a YAML file (not valid UTF-8 at byte {exc.start + 1})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{at}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def _absolute_path(value: str, base: Path) -> str:
    """A ``path`` value of a YAML file: ``~`` expanded (no shell did it), a relative path resolved
    against the file's own directory; URLs as given."""
    if "://" in value:
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _absolutize_paths(data, base: Path):
    """Resolve relative ``path`` values in a YAML file against the file's own directory."""
    if isinstance(data, dict):
        return {k: (_absolute_path(v, base) if k == "path" and isinstance(v, str)
                    else _absolutize_paths(v, base)) for k, v in data.items()}
    if isinstance(data, list):
        return [_absolutize_paths(v, base) for v in data]
    return data


# --------------------------------------------------------------------------- provenance


class Layers:
    """Merged configuration dictionaries that remember where each key came from."""

    def __init__(self):
        self.data: dict = {}
        self.origin: dict = {}
        self.rank: dict = {}  # key path -> index of the layer that set it (later layers win)
        self._layer = 0

    def add(self, data: dict, origin: str, prefix: tuple = ()) -> None:
        target = self.data
        for key in prefix:
            target = target.setdefault(key, {})
        self._layer += 1
        self._merge(target, data, origin, prefix)

    def _merge(self, target: dict, data: dict, origin: str, path: tuple) -> None:
        for key, value in data.items():
            here = path + (key,)
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                self.origin.setdefault(here, origin)
                self._merge(target[key], value, origin, here)
            else:
                target[key] = value
                self._mark(here, value, origin)

    def _mark(self, path: tuple, value, origin: str) -> None:
        self.origin[path] = origin
        self.rank[path] = self._layer
        if isinstance(value, dict):
            for key, sub in value.items():
                self._mark(path + (key,), sub, origin)

    def where(self, path: tuple) -> str:
        for i in range(len(path), 0, -1):
            if path[:i] in self.origin:
                return self.origin[path[:i]]
        return "the defaults"

    def given(self, path: tuple) -> bool:
        """Whether some layer set this key (as opposed to a default)."""
        return tuple(path) in self.origin

    def origin_of(self, path: tuple) -> str:
        """Where a key was set, or "the default" when no layer set it."""
        return self.origin[tuple(path)] if self.given(path) else "the default"

    def add_file(self, path, section: Optional[str] = None) -> None:
        path = Path(path)
        data = _absolutize_paths(load_yaml(path), path.resolve().parent)
        self.add(data, str(path), (section,) if section else ())

    def add_override(self, assignment: str) -> None:
        """``--set a.b.c=value``; the value is parsed as YAML (numbers, booleans, lists)."""
        key, sep, raw = assignment.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {assignment!r}: expected section.key=value")
        keys = tuple(k.strip() for k in key.split("."))
        if any(not k for k in keys):
            raise ConfigError(f"--set {assignment!r}: empty key segment in {key!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {assignment!r}: value is not valid YAML: {exc}") from None
        nested: Any = value
        for k in reversed(keys[1:]):
            nested = {k: nested}
        self.add({keys[0]: nested}, f"--set {assignment}")


# --------------------------------------------------------------------------- typed parsing


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, dict, tuple):
        return f"a {origin.__name__}"
    if tp in (list, dict):
        return f"a {tp.__name__}"
    if origin is typing.Union:
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp, value, path: tuple, where: Callable) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad():
        return ConfigError(f"{where(path)}: '{_dotted(path)}' must be {_describe(tp)}, got {value!r}")

    if tp is Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path, where)
            except ConfigError:
                pass
        raise bad()
    if origin is Literal:
        if value in args:
            return value
        raise bad()
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, where, path)
    if tp in (list, dict):  # bare annotations: any contents
        if not isinstance(value, tp):
            raise bad()
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad()
        return [_coerce(args[0], v, path + (i,), where) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad()
        items = args[:-1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise bad()
        return tuple(_coerce(t, v, path + (i,), where) for i, (t, v) in enumerate(zip(items, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        return {str(k): _coerce(args[1], v, path + (k,), where) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    if isinstance(tp, type) and isinstance(value, tp):  # any other plain class a plugin annotates with
        return value
    raise bad()


def field_aliases(cls) -> dict:
    """Alias spelling -> field name, from ``field(metadata={"aliases": [...]})``."""
    return {alias: f.name for f in dataclasses.fields(cls) for alias in f.metadata.get("aliases", ())}


def parse(cls, data, where: Callable = lambda path: "config", path: tuple = ()):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with a clear message."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where(path)}: '{_dotted(path) or 'config'}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    aliases = field_aliases(cls)
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        name = aliases.get(key, key)
        if name not in fields:
            known = sorted(fields) + sorted(aliases)
            hint = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{where(path + (key,))}: unknown key '{_dotted(path + (key,))}'{hint}; "
                              f"valid keys here: {', '.join(sorted(fields))}")
        if name in values:
            raise ConfigError(f"{where(path + (key,))}: '{_dotted(path + (key,))}' given twice "
                              f"(as '{name}' and an alias)")
        values[name] = _coerce(hints[name], value, path + (key,), where)
    for name, f in fields.items():
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where(path)}: missing required key '{_dotted(path + (name,))}'")
    obj = cls(**values)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ConfigError as exc:
            raise ConfigError(f"{_blame(exc, fields, aliases, data, path, where)}: {exc}",
                              keys=exc.keys) from None
    return obj


def _blame(exc: ConfigError, fields: dict, aliases: dict, data: dict, path: tuple, where: Callable) -> str:
    """Where the keys a validate() error is about were set: the keys it names (``exc.keys``) or,
    failing that, the fields its message mentions; their origins in layer order. Falls back to the
    section's origin when none of them was set by a layer."""
    names = exc.keys or tuple(n for n in fields if re.search(rf"(?<!\w){re.escape(n)}(?!\w)", str(exc)))
    given = {aliases.get(k, k): k for k in data}  # field name -> the spelling the layer used
    origins = []
    for name in names:
        if name in given:
            origin = where(path + (given[name],))
            if origin not in origins:
                origins.append(origin)
    return " and ".join(origins) if origins else where(path)


def to_dict(obj) -> Any:
    """Dataclasses to plain YAML-able values (for the resolved config)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- sections


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


@dataclass
class ModelConfig:
    """``model:`` the architecture, named as megatron-core's TransformerConfig / GPTModel arguments."""

    name: str = "unnamed"
    # the architecture family (plugins/megatron/families/): qwen2, llama, mistral, gpt2, gemma2, gpt_neox
    family: str = "qwen2"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None: multi-head attention
    kv_channels: Optional[int] = None  # None: hidden_size / num_attention_heads
    ffn_hidden_size: int = 256
    vocab_size: int = 256  # the tokenizer's vocabulary; padding for TP is the backend's job
    max_sequence_length: int = 2048
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    layernorm_epsilon: float = 1e-6
    # norms compute x / rms(x) * (1 + weight), weights starting at 0 (Gemma)
    layernorm_zero_centered_gamma: bool = False
    # swiglu / geglu_tanh: gated (SiLU / tanh-GELU of the gate times the up projection)
    activation: Literal["swiglu", "geglu_tanh", "gelu", "gelu_tanh", "silu"] = "swiglu"
    add_qkv_bias: bool = False
    add_bias_linear: bool = False
    # attention and MLP both read the layer input: x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX, GPT-J)
    parallel_residual: bool = False
    position_embedding_type: Literal["rope", "learned_absolute"] = "rope"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    share_embeddings_and_output_weights: bool = False
    # the embedding output is multiplied by this (Gemma: sqrt(hidden_size)); null = 1
    embedding_multiplier: Optional[float] = None
    # RoPE scaling: megatron-core's GPTModel args (its llama3 type) plus transformers' linear type and
    # the three llama3 parameters megatron-core hard-codes (1, 4, 8192), which the backend applies as given
    rope_scaling: bool = False
    rope_scaling_type: Literal["llama3", "linear"] = "llama3"
    rope_scaling_factor: float = 8.0
    rope_scaling_low_freq_factor: float = 1.0
    rope_scaling_high_freq_factor: float = 4.0
    rope_scaling_original_max_position_embeddings: int = 8192
    # attention scores are q.k * softmax_scale; null = 1/sqrt(head dim) (Gemma-2: query_pre_attn_scalar^-0.5)
    softmax_scale: Optional[float] = None
    # sliding-window attention: (left, right) tokens each query sees, as megatron-core's
    # TransformerConfig.window_size; null = full causal attention
    window_size: Optional[tuple[int, int]] = None
    # which layers use the window, as megatron-core's window_attn_skip_freq: null = every layer; N = all
    # but every N-th layer (1-based); a list of 1 (window) / 0 (full) per layer
    window_attn_skip_freq: Optional[Union[int, list[int]]] = None
    # tanh soft-capping cap * tanh(x / cap) of the attention scores and of the final logits (Gemma-2)
    attn_logit_softcapping: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    init_method_std: float = 0.02
    # the published checkpoint this config describes (e.g. Qwen/Qwen2.5-32B): a run then needs --load
    hf_name: Optional[str] = None
    # run-configuration defaults for this model, by section: run, optim, data, or a plugin's name
    # (e.g. the default parallel layout, suggested LISA settings, a micro-batch that fits)
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                     "ffn_hidden_size", "vocab_size", "max_sequence_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"model.{name} must be at least 1, got {value}", keys=(name,))
        for name in ("layernorm_epsilon", "rotary_base", "init_method_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"model.{name} must be a positive number, got {value}", keys=(name,))
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ConfigError(f"model.rotary_percent must be in (0, 1], got {self.rotary_percent}",
                              keys=("rotary_percent",))
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_query_groups={groups}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                              f"{self.num_attention_heads}; set kv_channels")
        if self.rope_scaling and self.rope_scaling_type == "llama3" and \
                self.rope_scaling_high_freq_factor <= self.rope_scaling_low_freq_factor:
            raise ConfigError(f"rope_scaling_high_freq_factor={self.rope_scaling_high_freq_factor} must be larger "
                              f"than rope_scaling_low_freq_factor={self.rope_scaling_low_freq_factor}")
        if self.window_size is not None and (self.window_size[0] < 0 or self.window_size[1] != 0):
            raise ConfigError(f"window_size={list(self.window_size)}: give [left, 0] with left >= 0 "
                              f"(causal attention sees no token to the right)")
        freq = self.window_attn_skip_freq
        if isinstance(freq, list) and (len(freq) != self.num_layers or set(freq) - {0, 1}):
            raise ConfigError(f"window_attn_skip_freq={freq}: give one 1 (window) or 0 (full attention) per "
                              f"layer, {self.num_layers} in all")
        if isinstance(freq, int) and freq < 1:
            raise ConfigError(f"window_attn_skip_freq={freq} must be at least 1")
        for key in ("attn_logit_softcapping", "final_logit_softcapping", "softmax_scale", "embedding_multiplier"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"{key}={getattr(self, key)} must be positive (or null)")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ConfigError(f"rotary_percent={self.rotary_percent} must be in (0, 1]")


FORMATS = ("text", "prompt_response", "alpaca", "sharegpt", "messages")
# the fields each format reads; ``columns`` may map any of them to another name in the data
FORMAT_FIELDS = {
    "text": ("text",),
    "prompt_response": ("prompt", "response"),
    "alpaca": ("instruction", "input", "output"),
    "sharegpt": ("conversations", "from", "value"),
    "messages": ("messages", "role", "content"),
}
FILE_TYPES = ("jsonl", "json", "csv", "tsv", "txt", "parquet", "arrow")


@dataclass
class SourceConfig:
    """One training source, the validation set or the test set: local files or a Hub dataset."""

    path: Optional[str] = None  # a file, a directory of files, a glob, or a `datasets` save_to_disk folder
    dataset: Optional[str] = None  # a Hugging Face Hub dataset name (needs the network)
    subset: Optional[str] = None  # the Hub dataset's configuration name
    split: str = "train"  # split of a Hub dataset or a save_to_disk folder
    revision: Optional[str] = None  # Hub revision (a commit hash pins the data)
    format: Literal["text", "prompt_response", "alpaca", "sharegpt", "messages"] = "text"
    # null: from the extension
    file_type: Optional[Literal["jsonl", "json", "csv", "tsv", "txt", "parquet", "arrow"]] = None
    columns: dict[str, str] = field(default_factory=dict)  # format field -> the name in this data
    max_samples: Optional[int] = None  # keep the first N valid records
    on_error: Optional[Literal["error", "skip"]] = None  # a malformed record; null: data.on_error
    on_empty: Optional[Literal["skip", "keep", "error"]] = None  # an empty response; null: data.on_empty

    def validate(self):
        if (self.path is None) == (self.dataset is None):
            raise ConfigError("a source needs exactly one of 'path' (local files) and 'dataset' (a Hub name)")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"max_samples must be at least 1, got {self.max_samples}")
        unknown = sorted(set(self.columns) - set(FORMAT_FIELDS[self.format]))
        if unknown:
            raise ConfigError(f"columns: {', '.join(unknown)} not read by format '{self.format}' (it reads "
                              f"{', '.join(FORMAT_FIELDS[self.format])})")


@dataclass
class TokenizerConfig:
    # auto: a directory with tokenizer.json -> huggingface; a .model file (or a directory with
    # tokenizer.model) -> sentencepiece
    type: Literal["auto", "sentencepiece", "huggingface"] = "auto"
    path: str = ""
    add_bos: bool = True
    add_eos: bool = True
    # chat formats: null = the tokenizer's own template when it has one, else the plain template;
    # "plain" = always the plain template; anything else is a Jinja chat template
    chat_template: Optional[str] = None


# the names of the held-out sets, wherever sets are named together (evaluation, exports, reports)
RESERVED_SOURCE_NAMES = ("validation", "test")


def source_name_problems(names) -> list:
    """Why these training-source names cannot be used (empty when they can): a name must be
    non-empty, free of control characters and path separators (exports name files after it), not
    ``validation`` or ``test`` in any case (the held-out sets' names: such a source would be
    exported, and scored, as if it were one), and different from every other name in more than
    case (files named after them would collide on case-insensitive file systems)."""
    problems, seen = [], {}
    for name in names:
        if not isinstance(name, str) or not name.strip():
            problems.append(f"a source name is empty ({name!r}): name every source")
            continue
        control = [c for c in name if unicodedata.category(c) == "Cc"]
        if control:
            problems.append(f"source name {name!r} holds a control character (U+{ord(control[0]):04X}); rename it")
        if "/" in name or "\\" in name:
            problems.append(f"source name {name!r} holds a path separator; exports name files after sources, "
                            f"rename it (e.g. {name.replace('/', '-').replace(chr(92), '-')!r})")
        if name.casefold() in RESERVED_SOURCE_NAMES:
            problems.append(f"source name {name!r} is reserved for the held-out set of that name: put held-out data "
                            f"under data.validation or data.test, and give a training source another name (a source "
                            f"called {name!r} would be exported into the mixture and reported as the held-out set)")
        other = seen.setdefault(name.casefold(), name)
        if other != name:
            problems.append(f"source names {other!r} and {name!r} differ only in case; rename one")
    return problems


@dataclass
class DataConfig:
    """``data:`` named training sources, the validation and test sets, the tokenizer, batching."""

    sources: dict[str, SourceConfig] = field(default_factory=dict)
    validation: Optional[SourceConfig] = None
    test: Optional[SourceConfig] = None
    tokenizer: Optional[TokenizerConfig] = None
    seq_length: int = 1024
    packing: bool = False  # several samples per row, with per-sample boundaries kept
    # weighted: rows drawn with pi as sampling probabilities (scalebio train), not weighted in the loss
    sampling: Literal["uniform", "stratified", "weighted"] = "uniform"
    batch_counts: dict[str, int] = field(default_factory=dict)  # stratified: samples per source per batch
    on_error: Literal["error", "skip"] = "error"  # a malformed record: stop, or skip and count it
    # a record whose response is empty (only EOS or the end-of-turn marker would be supervised)
    on_empty: Literal["skip", "keep", "error"] = "skip"
    overlap: Literal["error", "warn"] = "error"  # validation/test examples duplicated in a training source
    cache: bool = True  # keep tokenized sources on disk
    cache_dir: Optional[str] = None  # null: $SCALEBIO_CACHE or ~/.cache/scalebio

    def validate(self):
        problems = source_name_problems(self.sources)
        if problems:
            raise ConfigError("; ".join(problems))
        if self.seq_length < 2:
            raise ConfigError(f"seq_length must be at least 2, got {self.seq_length}")
        if self.batch_counts and self.sampling != "stratified":
            raise ConfigError("batch_counts is only used with sampling: stratified")
        unknown = sorted(set(self.batch_counts) - set(self.sources))
        if unknown:
            raise ConfigError(f"batch_counts names {', '.join(unknown)}, not among the sources "
                              f"({', '.join(sorted(self.sources))})")
        if self.batch_counts and set(self.batch_counts) != set(self.sources):
            missing = sorted(set(self.sources) - set(self.batch_counts))
            raise ConfigError(f"batch_counts must give a count for every source; missing: {', '.join(missing)}")
        if any(c < 1 for c in self.batch_counts.values()):
            raise ConfigError(f"batch_counts must be at least 1 per source, got {self.batch_counts}")
        seen = {}
        for name in sorted(self.sources):
            src = self.sources[name]
            same = (src.path, src.dataset, src.subset, src.split, src.revision, src.format, src.file_type,
                    tuple(sorted(src.columns.items())))
            if same in seen:
                raise ConfigError(f"sources '{seen[same]}' and '{name}' read the same data ({src.path or src.dataset}, "
                                  f"format {src.format}): their weights would split one source's share; remove one",
                                  keys=("sources",))
            seen[same] = name
        if self.packing and self.sampling == "stratified":
            raise ConfigError("packing and sampling: stratified do not combine (a packed batch has a fixed number "
                              "of rows, not of samples per source); choose one")


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


# --------------------------------------------------------------------------- model lookup


def model_configs_dir() -> Path:
    from . import model_configs  # the repository's model_configs/ folder, shipped in the package

    return Path(model_configs.__path__[0])


def available_models() -> list:
    return sorted(p.stem for p in model_configs_dir().glob("*.yaml"))


def find_model(name: str) -> Path:
    """A path to a model YAML, or the name of one in model_configs/."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        if not p.is_file():
            raise ConfigError(f"--model {name}: a directory, not a model YAML file")
        return p
    candidate = model_configs_dir() / f"{name}.yaml"
    if candidate.exists():
        return candidate
    if p.suffix in (".yaml", ".yml") or len(p.parts) > 1:  # meant as a path
        raise ConfigError(f"--model {name}: the file does not exist (a model YAML path, or a name from "
                          f"`scalebio models`: {', '.join(available_models())})")
    hint = difflib.get_close_matches(name, available_models(), n=1)
    hint = f" (did you mean '{hint[0]}'?)" if hint else ""
    raise ConfigError(f"unknown model '{name}'{hint}: not a YAML file and not in {model_configs_dir()}. "
                      f"Available: {', '.join(available_models())}")


def load_model(name: str) -> tuple:
    """(ModelConfig, path) of a model in model_configs/ or a model YAML file; its name defaults
    to the file's stem."""
    path = find_model(name)
    data = load_yaml(path)
    data.setdefault("name", path.stem)
    return parse(ModelConfig, data, lambda p: str(path), ("model",)), path
