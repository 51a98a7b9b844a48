"""Plugin discovery and selection (pluggy, entry-point group ``scalebio``).

Every installed plugin is loaded; a run takes the plugins the user names (``--plugins
lisa,tensorboard``, or ``plugins:`` in a config file) plus a default for each role not named. One
plugin per role; any number of observers (plugins without a role, such as ``tensorboard`` and
``wandb``). Only those are registered with the pluggy manager: an installed plugin that was not
named is not part of the run, so a logger is off until it is asked for. A plugin that fails to
import is an error only when it is named; one whose optional dependency is missing
(:class:`scalebio.extras.MissingDependency`) is listed with the command that installs it.

``SCALEBIO_LOAD_PLUGINS=a,b`` limits loading to those entry points (like llm's
``LLM_LOAD_PLUGINS``): a way out when an installed plugin misbehaves at import.
"""
from __future__ import annotations

import difflib
import importlib.metadata
import os
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Optional

import pluggy

from . import hookspecs
from .extras import MissingDependency
from .roles import ROLE_BASES

GROUP = "scalebio"
ROLE_HOOKS = {
    "solver": "scalebio_solver",
    "layer_selection": "scalebio_layer_selection",
    "weights": "scalebio_weights",
    "backend": "scalebio_backend",
}
DEFAULTS = {"solver": "minimax", "layer_selection": "full", "weights": "softmax", "backend": "megatron"}


class PluginError(Exception):
    """A plugin cannot be selected or used; the message says which and why."""


@dataclass
class PluginInfo:
    name: str
    value: str  # entry-point value, e.g. "scalebio_plugins.lisa"
    plugin: object = None
    dist: Optional[str] = None
    version: Optional[str] = None
    error: Optional[str] = None
    missing_dependency: bool = False  # the error is an optional package that is not installed
    hooks: list = field(default_factory=list)

    @property
    def roles(self) -> list:
        return [role for role, hook in ROLE_HOOKS.items() if hook in self.hooks]

    def describe(self) -> str:
        roles = ", ".join(r.replace("_", " ") for r in self.roles) or "observer"
        return f"{self.name} ({roles})"


def _hook_names(pm: pluggy.PluginManager, plugin: object) -> list:
    names = []
    for attr in dir(plugin):
        if attr.startswith("scalebio_") and pm.parse_hookimpl_opts(plugin, attr) is not None:
            names.append(attr)
    return sorted(names)


def discover(entry_points: Optional[Iterable] = None) -> dict:
    """Load every plugin of the ``scalebio`` group. Failures are recorded, not raised."""
    if entry_points is None:
        entry_points = importlib.metadata.entry_points(group=GROUP)
    only = os.environ.get("SCALEBIO_LOAD_PLUGINS")
    allowed = None if only is None else {n.strip() for n in only.split(",") if n.strip()}
    probe = pluggy.PluginManager(GROUP)
    infos: dict = {}
    for ep in entry_points:
        if allowed is not None and ep.name not in allowed:
            continue
        dist = getattr(ep, "dist", None)
        info = PluginInfo(name=ep.name, value=ep.value,
                          dist=dist.metadata["Name"] if dist is not None else None,
                          version=dist.version if dist is not None else None)
        if ep.name in infos:
            first = infos[ep.name]
            warnings.warn(f"scalebio plugin name '{ep.name}' is provided by both {first.value} "
                          f"({first.dist}) and {ep.value} ({info.dist}); using the first")
            continue
        try:
            info.plugin = ep.load()
            info.hooks = _hook_names(probe, info.plugin)
        except MissingDependency as exc:  # an optional plugin whose extra is not installed
            info.error, info.missing_dependency = str(exc), True
        except Exception as exc:  # a broken plugin must not take the tool down
            info.error = f"{type(exc).__name__}: {exc}"
        infos[ep.name] = info
    return infos


def _installed_list(infos: dict) -> str:
    return ", ".join(i.describe() for i in sorted(infos.values(), key=lambda i: i.name)) or "(none)"


def select(infos: dict, requested: Iterable[str]) -> dict:
    """Map each role to a plugin name from the requested names plus the defaults (the requested
    observers are :func:`observers`)."""
    chosen: dict = {}
    for name in requested:
        info = infos.get(name)
        if info is None:
            hint = difflib.get_close_matches(name, list(infos), n=1)
            hint = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise PluginError(f"unknown plugin '{name}'{hint}. Installed plugins: {_installed_list(infos)}")
        if info.missing_dependency:
            raise PluginError(f"plugin '{name}' {info.error}")
        if info.error is not None:
            raise PluginError(f"plugin '{name}' ({info.value}) failed to import: {info.error}")
        for role in info.roles:
            if role in chosen and chosen[role] != name:
                raise PluginError(
                    f"plugins '{chosen[role]}' and '{name}' both take the {role.replace('_', ' ')} role; "
                    f"name only one. Installed plugins: {_installed_list(infos)}")
            chosen[role] = name
    for role, default in DEFAULTS.items():
        if role in chosen:
            continue
        info = infos.get(default)
        if info is None or role not in info.roles:
            raise PluginError(f"no plugin for the {role.replace('_', ' ')} role: the default '{default}' is "
                              f"not installed. Installed plugins: {_installed_list(infos)}")
        if info.error is not None:
            raise PluginError(f"default plugin '{default}' ({info.value}) failed to import: {info.error}")
        chosen[role] = default
    return chosen


def observers(infos: dict, requested: Iterable[str]) -> list:
    """The requested plugins that take no role, in the order given (checked by :func:`select`)."""
    return list(dict.fromkeys(n for n in requested if n in infos and not infos[n].roles and infos[n].error is None))


def override(configured: Iterable[str], requested: Iterable[str], infos: dict) -> list:
    """The config files' plugins, less those of a role a plugin named on the command line takes,
    then the command line's: ``--plugins doremi`` replaces a recipe's ``simplex``, as ``--set``
    replaces a config value. Two plugins of one role within either list still conflict."""
    requested = [r for r in requested if r]
    taken = {role for name in requested if name in infos for role in infos[name].roles}
    kept = [c for c in configured if c not in infos or not set(infos[c].roles) & taken]
    return kept + requested


class Plugins:
    """The plugins of one run: one per role (``selected``) plus the named observers (``observers``)."""

    def __init__(self, requested: Iterable[str] = (), infos: Optional[dict] = None):
        self.infos = discover() if infos is None else infos
        requested = [r for r in requested if r]
        self.selected = select(self.infos, requested)
        self.observers = observers(self.infos, requested)
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        active = set(self.selected.values()) | set(self.observers)
        for info in self.infos.values():
            if info.error is not None:
                if info.name not in active and not info.missing_dependency:
                    warnings.warn(f"scalebio plugin '{info.name}' ({info.value}) failed to import and is "
                                  f"skipped: {info.error}")
                continue
            if info.name in active:
                self.pm.register(info.plugin, name=info.name)

    @property
    def hook(self):
        return self.pm.hook

    def role_class(self, role: str) -> type:
        """The class the selected plugin returns for ``role``, checked against the role base."""
        name = self.selected[role]
        impl = getattr(self.infos[name].plugin, ROLE_HOOKS[role])
        cls = impl()
        base = ROLE_BASES[role]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(f"plugin '{name}': {ROLE_HOOKS[role]}() must return a subclass of "
                              f"scalebio.roles.{base.__name__}, got {cls!r}")
        cls.plugin_name = name
        return cls


def format_table(infos: dict) -> str:
    """The table printed by ``scalebio plugins``."""
    rows = [("name", "role", "version", "hooks")]
    for info in sorted(infos.values(), key=lambda i: i.name):
        roles = ", ".join(r.replace("_", " ") for r in info.roles) or ("-" if info.error else "observer")
        version = info.version or "-"
        if info.dist and info.dist != "scalebio":
            version = f"{info.dist} {version}"
        if info.missing_dependency:
            hooks = f"NOT AVAILABLE: {info.error}"
        else:
            hooks = ", ".join(info.hooks) if info.error is None else f"FAILED TO IMPORT: {info.error}"
        rows.append((info.name, roles, version, hooks))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows]
    defaults = ", ".join(f"{role.replace('_', ' ')}={name}" for role, name in DEFAULTS.items())
    return "\n".join(lines + ["", f"defaults: {defaults}; observers run only when named (--plugins NAME)"])
