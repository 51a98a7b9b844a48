"""Layered YAML with provenance and typed parsing into dataclasses (the machinery of
:mod:`scalebio.config`): a strict loader, :class:`Layers`, :func:`parse`."""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Optional

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


# keys whose values are paths (a data YAML's cache_dir too: else it lands wherever the command runs)
PATH_KEYS = ("path", "cache_dir")


def _absolutize_paths(data, base: Path):
    """Resolve relative path values (:data:`PATH_KEYS`) in a YAML file against the file's own directory."""
    if isinstance(data, dict):  # an empty cache_dir stays empty: the default cache
        return {k: (_absolute_path(v, base) if k in PATH_KEYS and isinstance(v, str) and (v or k == "path")
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
        given = [a for a in args if a is not type(None)]
        if len(given) == 1:  # Optional[X]: X's own error names the key inside it (data.tokenizer.type)
            return _coerce(given[0], value, path, where)
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
