"""Documentation that must not drift: every hook, every option, the README commands and CI."""
from __future__ import annotations

import dataclasses
import inspect
import re

from helpers import REPO
from scalebio import config, hookspecs
from scalebio_plugins import doremi, fixed, lisa, minimax, simplex, softmax, train
from scalebio_plugins.megatron import backend


def test_every_hook_spec_is_documented():
    guide = (REPO / "docs" / "plugins.md").read_text()
    hooks = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("scalebio_")]
    assert len(hooks) == 8
    missing = [h for h in hooks if f"### `{h}(" not in guide]
    assert not missing, f"hooks without a section in docs/plugins.md: {missing}"


def test_every_option_is_documented():
    ref = (REPO / "docs" / "configuration.md").read_text()
    classes = {"run": config.RunOptions, "optim": config.OptimOptions, "model": config.ModelConfig,
               "data": config.DataConfig, "minimax": minimax.MinimaxOptions, "lisa": lisa.LisaOptions,
               "softmax": softmax.SoftmaxOptions, "simplex": simplex.SimplexOptions,
               "megatron": backend.MegatronOptions, "train": train.TrainOptions, "fixed": fixed.FixedOptions,
               "doremi": doremi.DoremiOptions}
    missing = []
    for section, cls in classes.items():
        body = ref.split(f"## `{section}`", 1)[1].split("\n## ", 1)[0]
        missing += [f"{section}.{f.name}" for f in dataclasses.fields(cls) if f"`{f.name}`" not in body]
    assert not missing, f"options missing from docs/configuration.md: {missing}"


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    demo, tests = blocks[0], blocks[1]
    assert readme.index(demo) < 600 and "tools/run.py" in demo and "pip install" in demo
    assert "pytest" in tests
    ci = (REPO / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), ".ci/run must run the README's test command verbatim"
