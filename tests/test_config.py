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


def test_an_error_names_where_its_key_was_set_not_where_the_section_began(tmp_path):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("run:\n  steps: 5\noptim:\n  lr: 1e-5\n")
    second.write_text("run:\n  log_every: 0\n")
    with pytest.raises(ConfigError, match=r"^\S*second\.yaml: run\.log_every must be at least 1"):
        prepare(tiny_request(tmp_path, configs=[first, second]))
    # a flag's key, after files that set the section
    with pytest.raises(ConfigError, match=r"^--set optim\.adam_beta2=1\.0: optim\.adam_beta2 must be in \[0, 1\)"):
        prepare(tiny_request(tmp_path, "optim.adam_beta2=1.0", configs=[first]))
    with pytest.raises(ConfigError, match=r"^--steps 0: run\.steps must be at least 1"):
        req = tiny_request(tmp_path, configs=[first])
        req.steps = 0
        prepare(req)
    # a plugin's own validate(), which names no keys: the keys its message mentions
    with pytest.raises(ConfigError, match=r"^--set minimax\.alpha=0: minimax\.alpha must be positive"):
        prepare(tiny_request(tmp_path, "minimax.alpha=0", configs=[first]))
    # an error about two keys names both origins
    with pytest.raises(ConfigError, match=r"^--set model\.num_attention_heads=4 and --set model\.num_query_groups=3: "
                                          r"num_attention_heads=4 is not a multiple of num_query_groups=3"):
        prepare(tiny_request(tmp_path, "model.num_query_groups=3"))


def test_impossible_values_are_refused_by_name(tmp_path):
    for setting, message in [("optim.lr=-1", r"optim\.lr must be >= 0"), ("optim.lr_w=.nan", "optim.lr_w must be a finite"),
                             ("optim.adam_beta1=1", r"adam_beta1 must be in \[0, 1\)"),
                             ("optim.adam_eps=0", "adam_eps must be positive"),
                             ("optim.min_lr_ratio=2", r"min_lr_ratio must be in \[0, 1\]"),
                             ("model.num_layers=0", "num_layers must be at least 1"),
                             ("model.vocab_size=0", "vocab_size must be at least 1"),
                             ("model.layernorm_epsilon=0", "layernorm_epsilon must be a positive number"),
                             ("run.seed=-1", r"run\.seed must be in \[0, 2\*\*32\)"),
                             ("run.out=runs/{name}", r"unknown placeholder \{name\}"),
                             ("run.out=runs/{model", "expected '}' before end of string"),
                             ("run.out=runs/}", "Single '}' encountered"),
                             ("data.on_empty=drop", "'data.on_empty' must be one of 'skip', 'keep', 'error'")]:
        with pytest.raises(ConfigError, match=message):
            prepare(tiny_request(tmp_path, setting))
    p = prepare(tiny_request(tmp_path, "run.out=runs/{model}-{{literal}}-{time}"))
    assert p.config.run.out == "runs/{model}-{{literal}}-{time}"


def test_sequence_length_beyond_the_models_positions(tmp_path):
    # RoPE: a warning, shown when the run opens
    p = prepare(tiny_request(tmp_path, "data.seq_length=300"))
    assert len(p.config.warnings) == 1
    assert "data.seq_length=300 (--set data.seq_length=300) exceeds model.max_sequence_length=256" in p.config.warnings[0]
    assert not prepare(tiny_request(tmp_path)).config.warnings
    # learned positions: there is no embedding past the table
    with pytest.raises(ConfigError, match=r"data\.seq_length=300 .* exceeds model\.max_sequence_length=256 \(\S*tiny\.yaml\), "
                                          r"the size of the model's learned position embeddings"):
        prepare(tiny_request(tmp_path, "data.seq_length=300", "model.position_embedding_type=learned_absolute"))


def test_missing_model_and_checkpoint_paths_say_they_do_not_exist(tmp_path):
    req = tiny_request(tmp_path)
    req.model = str(tmp_path / "my-model.yaml")
    with pytest.raises(ConfigError, match=r"--model \S*my-model\.yaml: the file does not exist"):
        prepare(req)
    req.model = "tinny"
    with pytest.raises(ConfigError, match=r"unknown model 'tinny' \(did you mean 'tiny'\?\)"):
        prepare(req)
    req.model, req.load = None, str(tmp_path / "ckpt")
    with pytest.raises(ConfigError, match=r"--load \S*ckpt: the path does not exist"):
        prepare(req)
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ConfigError, match=r"--load \S*ckpt: no model\.yaml there"):
        prepare(req)
