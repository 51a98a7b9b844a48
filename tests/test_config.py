"""Configuration: unknown keys name key and file, overrides, types, the resolved config."""
from __future__ import annotations

import pytest
import yaml

from helpers import tiny_request
from scalebio.config import ConfigError, Layers, load_yaml
from scalebio.runner import prepare, resolved_config


def test_unknown_key_in_a_config_file_names_key_and_file(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("run:\n  stpes: 10\n")
    with pytest.raises(ConfigError) as err:
        prepare(tiny_request(tmp_path, configs=[cfg]))
    msg = str(err.value)
    assert "run.stpes" in msg and str(cfg) in msg and "did you mean 'steps'" in msg


def test_unknown_key_in_a_model_file_names_that_file(tmp_path):
    model = tmp_path / "m.yaml"
    model.write_text("num_layers: 2\nhidden_sise: 64\n")
    req = tiny_request(tmp_path)
    req.model = str(model)
    with pytest.raises(ConfigError, match=r"m\.yaml.*unknown key 'model\.hidden_sise'"):
        prepare(req)


def test_unknown_section_and_plugin_option_typos_are_errors(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lisaa:\n  gamma: 2\n")
    with pytest.raises(ConfigError, match=r"unknown section 'lisaa' \(did you mean 'lisa'\?\)"):
        prepare(tiny_request(tmp_path, configs=[cfg]))
    # a section for an installed plugin that is not selected is still checked
    cfg.write_text("lisa:\n  gama: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key 'lisa\.gama'"):
        prepare(tiny_request(tmp_path, configs=[cfg]))


def test_set_overrides_win_and_bad_values_name_the_flag(tmp_path):
    p = prepare(tiny_request(tmp_path, "optim.lr=3e-4", "minimax.alpha=25", "lisa.lisa_interval_steps=7",
                             plugins=["lisa"]))
    assert p.config.optim.lr == 3e-4  # "3e-4" is a string to YAML 1.1; floats accept it
    assert p.options["solver"].alpha == 25.0
    assert p.options["layer_selection"].interval == 7
    with pytest.raises(ConfigError, match=r"--set run\.steps=many: 'run\.steps' must be int"):
        prepare(tiny_request(tmp_path, "run.steps=many"))
    with pytest.raises(ConfigError, match=r"'optim\.schedule' must be one of 'cosine', 'linear', 'constant'"):
        prepare(tiny_request(tmp_path, "optim.schedule=step"))


def test_model_defaults_sit_below_user_settings(tmp_path):
    p = prepare(tiny_request(tmp_path, plugins=["lisa"]))
    assert p.options["layer_selection"].gamma == 2  # model_configs/tiny.yaml suggests gamma 2
    p = prepare(tiny_request(tmp_path, "lisa.gamma=3", plugins=["lisa"]))
    assert p.options["layer_selection"].gamma == 3


def test_resolved_config_has_every_section_and_round_trips(tmp_path):
    p = prepare(tiny_request(tmp_path, plugins=["lisa", "simplex"]))
    resolved = resolved_config(p)
    assert resolved["plugins"] == {"solver": "minimax", "layer_selection": "lisa", "weights": "simplex",
                                   "backend": "megatron", "observers": []}
    for key in ("run", "optim", "model", "data", "minimax", "lisa", "simplex", "megatron"):
        assert key in resolved
    text = yaml.safe_dump(resolved)
    again = tmp_path / "again.yaml"
    again.write_text(text)
    assert load_yaml(again) == resolved


def test_yaml_errors_name_line_and_duplicates(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  steps: 3\n  steps: 4\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*line 3.*duplicate key 'steps'"):
        load_yaml(bad)
    bad.write_text("run: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+"):
        load_yaml(bad)


def test_relative_paths_resolve_against_the_yaml_file(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    f = sub / "data.yaml"
    f.write_text("sources:\n  a: {path: a.jsonl}\n")
    layers = Layers()
    layers.add_file(f, "data")
    assert layers.data["data"]["sources"]["a"]["path"] == str(sub / "a.jsonl")
    assert layers.where(("data", "sources", "a", "path")) == str(f)
