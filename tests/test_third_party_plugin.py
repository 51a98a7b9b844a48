"""A third-party plugin package, built and pip-installed here, found, listed, selected, in effect."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import REPO, TINY

PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "scalebio-fixedweights"
version = "1.2.3"

[project.entry-points.scalebio]
pinned = "scalebio_fixedweights"
"""

MODULE = '''\
"""Weights that never move (a baseline mixture), and an observer that logs every step."""
from dataclasses import dataclass

import torch

from scalebio import hookimpl
from scalebio.roles import Weights


@dataclass
class FixedOptions:
    weights: dict


class Fixed(Weights):
    Options = FixedOptions

    def __init__(self, options, source_names):
        super().__init__(options, source_names)
        pi = torch.tensor([float(options.weights[n]) for n in source_names], dtype=torch.float64)
        self.pi = pi / pi.sum()

    def probs(self):
        return self.pi.clone()

    def update(self, grad_pi, lr_scale):
        pass


@hookimpl
def scalebio_weights():
    return Fixed


@hookimpl
def scalebio_step_end(run, step, metrics):
    if run.is_main:
        with open(run.out_dir / "observed.txt", "a") as fh:
            fh.write(f"{step} {metrics['val_loss']:.6f}\\n")
'''


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("thirdparty")
    pkg = root / "pkg"
    pkg.mkdir()
    (pkg / "pyproject.toml").write_text(PYPROJECT)
    (pkg / "scalebio_fixedweights.py").write_text(MODULE)
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(pkg)], check=True, capture_output=True, text=True)
    env = dict(os.environ, PYTHONPATH=str(site))
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return root, env


def test_listed_with_role_and_version(installed):
    _, env = installed
    out = subprocess.run([sys.executable, "-m", "scalebio.cli", "plugins"], env=env, capture_output=True,
                         text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("pinned "))
    assert "weights" in line and "scalebio-fixedweights 1.2.3" in line
    assert "scalebio_step_end" in line and "scalebio_weights" in line


def test_selected_by_name_and_takes_effect(installed):
    root, env = installed
    out = root / "run"
    cmd = [sys.executable, str(REPO / "tools" / "run.py"), "--plugins", "pinned", "--steps", "3",
           "--out", str(out), "--set", "pinned.weights={clean: 0.5, shuffled: 0.3, typos: 0.2}"]
    for s in TINY:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = json.loads((out / "weights.json").read_text())
    assert weights == pytest.approx({"clean": 0.5, "shuffled": 0.3, "typos": 0.2})
    assert [ln.split()[0] for ln in (out / "observed.txt").read_text().splitlines()] == ["0", "1", "2"]
    config = (out / "config.yaml").read_text()
    assert "weights: pinned" in config


def test_unknown_option_of_the_third_party_plugin_is_an_error(installed):
    root, env = installed
    cmd = [sys.executable, str(REPO / "tools" / "run.py"), "--plugins", "pinned", "--steps", "1",
           "--out", str(root / "run2"), "--set", "pinned.wieghts={clean: 1}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown key 'pinned.wieghts'" in proc.stderr and "--set pinned.wieghts" in proc.stderr


def test_plugin_docs_example_matches(installed):
    # the plugin authoring guide shows this same layout; keep them in step
    guide = (REPO / "docs" / "plugins.md").read_text()
    assert "[project.entry-points.scalebio]" in guide and textwrap.dedent(PYPROJECT).splitlines()[-2] in guide


def test_third_party_runs_the_conformance_kit(installed):
    _, env = installed
    code = ("from scalebio.testing import check_weights\n"
            "check_weights('fixed', options={'weights': {'a': 0.5, 'b': 0.3, 'c': 0.2}}, learns=False)\n"
            "print('conforms')\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "conforms" in proc.stdout, proc.stderr[-2000:]
    # and the kit's own rule: a fixed plugin does not learn, so asking it to is a conformance error
    proc = subprocess.run([sys.executable, "-c", code.replace("learns=False", "learns=True")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "ConformanceError" in proc.stderr and "update(grad, lr_scale=0)" not in proc.stderr
