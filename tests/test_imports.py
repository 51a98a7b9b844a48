"""No import cycles inside scalebio (lazy imports included): each module can be read, tested and
replaced from the bottom up. The runner <-> evaluate cycle of issue 12 was one."""
from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO


def _modules(root: Path) -> dict:
    out = {}
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _edges(name: str, path: Path, modules: dict) -> set:
    """Modules of the tree that ``name`` imports anywhere in its body (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_cycles(root: Path) -> list:
    """The import cycles among the modules under package ``root`` (Tarjan's strongly connected
    components of more than one module), each as a sorted list of module names."""
    modules = _modules(root)
    graph = {n: _edges(n, f, modules) for n, f in modules.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles_in_the_core():
    assert import_cycles(REPO / "scalebio") == []


def test_a_lazy_import_cycle_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "runner.py").write_text("def loop():\n    from .evaluate import score\n")
    (pkg / "evaluate.py").write_text("def score():\n    from pkg.runner import loop\n")
    (pkg / "leaf.py").write_text("from . import runner\n")
    assert import_cycles(pkg) == [["pkg.evaluate", "pkg.runner"]]
