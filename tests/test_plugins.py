"""Plugin discovery and selection through real entry points."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap

import pytest

from scalebio.plugins import DEFAULTS, Plugins, PluginError, discover, format_table, override, select

BUILTIN = {"minimax", "full", "lisa", "softmax", "simplex", "megatron"}


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """Modules for fake third-party entry points: a second solver, a broken one, an observer."""
    (tmp_path / "other_solver.py").write_text(textwrap.dedent("""
        from scalebio import hookimpl
        from scalebio.roles import Solver
        class Other(Solver):
            pass
        @hookimpl
        def scalebio_solver():
            return Other
    """))
    (tmp_path / "broken_plugin.py").write_text("raise ImportError('needs a library that is not installed')\n")
    (tmp_path / "observer_plugin.py").write_text(textwrap.dedent("""
        from scalebio import hookimpl
        @hookimpl
        def scalebio_step_end(run, step, metrics):
            pass
    """))
    (tmp_path / "bad_role.py").write_text(textwrap.dedent("""
        from scalebio import hookimpl
        @hookimpl
        def scalebio_weights():
            return dict
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _eps(*extra):
    eps = list(importlib.metadata.entry_points(group="scalebio"))
    return eps + [importlib.metadata.EntryPoint(n, v, "scalebio") for n, v in extra]


def test_builtins_are_registered_through_entry_points():
    infos = discover()
    assert BUILTIN <= set(infos)
    assert {n: infos[n].roles for n in BUILTIN} == {
        "minimax": ["solver"], "full": ["layer_selection"], "lisa": ["layer_selection"],
        "softmax": ["weights"], "simplex": ["weights"], "megatron": ["backend"]}
    assert all(infos[n].version for n in BUILTIN)
    # installed under a namespaced package, never as a top-level `plugins`
    assert all(infos[n].value.startswith("scalebio_plugins.") for n in BUILTIN)


def test_defaults_fill_unnamed_roles():
    assert select(discover(), []) == DEFAULTS
    assert select(discover(), ["lisa", "simplex"]) == {**DEFAULTS, "layer_selection": "lisa", "weights": "simplex"}


def test_unknown_name_suggests_and_lists_installed():
    with pytest.raises(PluginError) as err:
        select(discover(), ["lsia"])
    msg = str(err.value)
    assert "unknown plugin 'lsia'" in msg and "did you mean 'lisa'" in msg and "megatron (backend)" in msg


def test_two_plugins_of_one_role():
    with pytest.raises(PluginError, match="'full' and 'lisa' both take the layer selection role"):
        select(discover(), ["full", "lisa"])


def test_selected_broken_plugin_fails_unselected_only_warns(plugin_dir):
    infos = discover(_eps(("broken", "broken_plugin")))
    assert "needs a library" in infos["broken"].error
    with pytest.raises(PluginError, match="plugin 'broken' .* failed to import: ImportError: needs a library"):
        Plugins(["broken"], infos=infos)
    with pytest.warns(UserWarning, match="'broken'.*failed to import and is skipped"):
        plugins = Plugins(["lisa"], infos=infos)
    assert plugins.selected["layer_selection"] == "lisa"
    assert "FAILED TO IMPORT" in format_table(infos)


def test_observers_run_only_when_named_and_unselected_role_plugins_never(plugin_dir):
    infos = discover(_eps(("other", "other_solver"), ("watch", "observer_plugin")))
    registered = {name for name, _ in Plugins(["lisa"], infos=infos).pm.list_name_plugin()}
    assert "lisa" in registered and "watch" not in registered  # installed but not named: off
    assert "other" not in registered and "full" not in registered
    plugins = Plugins(["lisa", "watch"], infos=infos)
    assert "watch" in {name for name, _ in plugins.pm.list_name_plugin()}
    assert plugins.observers == ["watch"] and "watch" not in plugins.selected.values()
    with pytest.raises(PluginError, match="'minimax' and 'other' both take the solver role"):
        Plugins(["minimax", "other"], infos=infos)
    assert Plugins(["other"], infos=infos).role_class("solver").__name__ == "Other"


def test_builtin_loggers_are_observers_off_by_default():
    infos = discover()
    assert infos["tensorboard"].roles == [] and infos["wandb"].roles == []
    assert {"scalebio_run_start", "scalebio_step_end", "scalebio_run_end"} <= set(infos["tensorboard"].hooks)
    assert Plugins([], infos=infos).observers == []
    registered = {name for name, _ in Plugins(["tensorboard"], infos=infos).pm.list_name_plugin()}
    assert "tensorboard" in registered and "wandb" not in registered


def test_missing_optional_dependency_is_quiet_until_named(plugin_dir, recwarn):
    (plugin_dir / "needs_extra.py").write_text(textwrap.dedent("""
        from scalebio import hookimpl
        from scalebio.extras import require
        require("no_such_module_for_scalebio", "fancy")
        @hookimpl
        def scalebio_step_end(run, step, metrics):
            pass
    """))
    infos = discover(_eps(("fancy", "needs_extra")))
    assert infos["fancy"].missing_dependency
    Plugins(["lisa"], infos=infos)
    assert not [w for w in recwarn if "fancy" in str(w.message)]  # not named: no warning
    with pytest.raises(PluginError, match=r"plugin 'fancy' needs the 'no_such_module_for_scalebio' package, which "
                                          r"is not installed: pip install 'scalebio\[fancy\]'"):
        Plugins(["fancy"], infos=infos)
    line = next(ln for ln in format_table(infos).splitlines() if ln.startswith("fancy "))
    assert "NOT AVAILABLE" in line and "pip install 'scalebio[fancy]'" in line


def test_role_hook_must_return_the_role_class(plugin_dir):
    plugins = Plugins(["badrole"], infos=discover(_eps(("badrole", "bad_role"))))
    with pytest.raises(PluginError, match="must return a subclass of scalebio.roles.Weights"):
        plugins.role_class("weights")


def test_load_plugins_environment_variable_limits_loading(monkeypatch):
    monkeypatch.setenv("SCALEBIO_LOAD_PLUGINS", "minimax,megatron")
    assert set(discover()) == {"minimax", "megatron"}


def test_scalebio_plugins_command_lists_roles_versions_hooks():
    out = subprocess.run([sys.executable, "-m", "scalebio.cli", "plugins"], capture_output=True, text=True,
                         check=True).stdout
    for name in BUILTIN:
        assert name in out
    assert "layer selection" in out and "scalebio_layer_selection" in out and "0.1.0" in out


def test_command_line_plugin_replaces_the_config_files_plugin_of_its_role():
    infos = discover()
    assert override(["lisa", "simplex"], ["doremi"], infos) == ["lisa", "doremi"]
    assert override(["lisa", "simplex"], ["train", "fixed"], infos) == ["lisa", "train", "fixed"]
    assert override(["lisa", "simplex"], [], infos) == ["lisa", "simplex"]
    # within the command line (or within a config) two of one role still conflict
    with pytest.raises(PluginError, match="'softmax' and 'simplex' both take the weights role"):
        Plugins(override(["lisa"], ["softmax", "simplex"], infos), infos=infos)
