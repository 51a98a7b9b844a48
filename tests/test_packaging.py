"""The package as a user installs it: a wheel with every module and data file, every runtime import
declared, one ``scalebio`` command for every tool, and tools/*.py as thin wrappers of it."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from helpers import REPO
from scalebio.commands import COMMANDS

# imports of optional extras, each behind a check with a clear message (scalebio.extras) or a fallback
# modules only optional features import, each behind a check that names its extra
OPTIONAL = {"transformer_engine": "gpu", "tensorboard": "tensorboard", "wandb": "wandb",
            "transformers": "gguf", "gguf": "gguf"}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the checkout (the build writes build/ and *.egg-info next to
    the sources; a copy keeps the checkout clean)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info",
                                                             "__pycache__", "runs", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(root / "dist"), str(src)], check=True, capture_output=True, text=True, timeout=300)
    (path,) = (root / "dist").glob("scalebio-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_has_every_module_and_data_file(wheel):
    names = set(wheel.namelist())
    want = set()
    for folder, package in (("scalebio", "scalebio"), ("plugins", "scalebio_plugins"),
                            ("model_configs", "scalebio/model_configs")):
        for f in (REPO / folder).rglob("*"):
            if f.is_file() and "__pycache__" not in f.parts and f.suffix in (".py", ".yaml", ".jsonl", ".model"):
                want.add(f"{package}/{f.relative_to(REPO / folder).as_posix()}")
    assert "scalebio/data/cache.py" in want and "scalebio/demo/tokenizer.model" in want  # the walk works
    assert not want - names, f"missing from the wheel: {sorted(want - names)}"
    top = {n.split("/")[0] for n in names}
    assert top == {"scalebio", "scalebio_plugins", "scalebio-0.1.0.dist-info"}, top  # never a top-level `plugins`


def test_wheel_metadata_declares_entry_points_and_dependencies(wheel):
    meta = wheel.read("scalebio-0.1.0.dist-info/METADATA").decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    base = {_canon(re.split(r"[ <>=!~;\[(]", r, 1)[0]) for r in requires if "extra ==" not in r}
    assert {"safetensors", "torch", "megatron-core", "pyarrow"} <= base
    assert "transformers" not in base and "Provides-Extra: hf" in meta
    eps = wheel.read("scalebio-0.1.0.dist-info/entry_points.txt").decode()
    installed = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="scalebio")
                 if ep.value.startswith("scalebio_plugins.")}
    for name, value in installed.items():
        assert f"{name} = {value}" in eps
    assert "scalebio = scalebio.cli:main" in eps


def _imports(path):
    """Top-level names of every import in a file, at any depth (lazy imports included)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node.lineno


def undeclared_imports(requires: set, optional: dict) -> list:
    """Imports in scalebio/ and plugins/ that no base requirement provides (and that are not a
    known optional extra), as ``file:line: module (distribution)``."""
    dists = importlib.metadata.packages_distributions()
    own = {"scalebio", "scalebio_plugins", "__future__"}
    problems = []
    for folder in ("scalebio", "plugins"):
        for f in sorted((REPO / folder).rglob("*.py")):
            for mod, line in _imports(f):
                if mod in own or mod in sys.stdlib_module_names or mod in optional:
                    continue
                provided = {_canon(d) for d in dists.get(mod, [])}
                if not provided & requires:
                    problems.append(f"{f.relative_to(REPO)}:{line}: {mod} ({', '.join(sorted(provided)) or '?'})")
    return problems


def _base_requirements() -> set:
    reqs = importlib.metadata.requires("scalebio") or []
    return {_canon(re.split(r"[ <>=!~;\[(]", r, 1)[0]) for r in reqs if "extra ==" not in r}


def test_every_runtime_import_is_a_declared_dependency():
    extras = importlib.metadata.metadata("scalebio").get_all("Provides-Extra")
    assert set(OPTIONAL.values()) <= set(extras), extras
    base = _base_requirements()
    assert not undeclared_imports(base, OPTIONAL)
    # negative control: without safetensors in the requirements (as before issue 12), it is reported
    missing = undeclared_imports(base - {"safetensors"}, OPTIONAL)
    assert missing and all("safetensors" in m for m in missing), missing


def test_every_tool_is_a_subcommand(capsys):
    from scalebio.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    listed = capsys.readouterr().out
    for command in ("run", "plugins", "models", "prepare", "export", "eval") + tuple(COMMANDS):
        assert command in listed
        if command not in ("plugins", "models"):
            with pytest.raises(SystemExit) as exit_:
                main([command, "--help"])
            assert exit_.value.code == 0, command
    assert {"convert", "plan", "bench", "bench-parallel"} <= set(COMMANDS)


@pytest.mark.parametrize("tool,command", [("convert.py", "convert"), ("plan.py", "plan"), ("bench.py", "bench"),
                                          ("bench_parallel.py", "bench-parallel"), ("evaluate.py", "eval"),
                                          ("export_mixture.py", "export"), ("prepare_data.py", "prepare"),
                                          ("train.py", "train"), ("compare.py", "compare")])
def test_tools_are_thin_wrappers_of_the_subcommands(tool, command):
    text = (REPO / "tools" / tool).read_text()
    assert len(text.splitlines()) < 15 and f'main(["{command}"]' in text
    via_tool = subprocess.run([sys.executable, str(REPO / "tools" / tool), "--help"], capture_output=True, text=True,
                              timeout=120)
    via_cli = subprocess.run([sys.executable, "-m", "scalebio", command, "--help"], capture_output=True, text=True,
                             timeout=120)
    assert via_tool.returncode == via_cli.returncode == 0, via_tool.stderr + via_cli.stderr
    assert via_tool.stdout == via_cli.stdout


def test_plan_runs_from_the_package():
    proc = subprocess.run([sys.executable, "-m", "scalebio", "plan", "--model", "qwen2.5-7b", "--gpus", "8"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "recommended: TP" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "scalebio", "plan", "--model", "qwen9"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown model 'qwen9'") and "Traceback" not in bad.stderr
