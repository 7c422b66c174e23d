"""No import cycle among the project's packages, counting every import (also those inside functions, which only
hide a cycle from the interpreter), read with ``ast`` without importing anything."""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "actors", "bench", "configs", "transport")


def module_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    """{module: the project modules it imports}, for every .py file under ``packages``."""
    files = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
             for pkg in packages for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in files and t != name}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from pkg import b\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from pkg.a import x\n")
    (tmp_path / "pkg" / "c.py").write_text("import pkg.a\n")
    assert cycles(module_graph(tmp_path, ("pkg",))) == [["pkg.a", "pkg.b"]]


def test_no_import_cycle_in_the_project():
    graph = module_graph()
    assert "bench.cli" in graph and "configs.schema" in graph["engine.rewards.judge"]
    assert cycles(graph) == []


def test_every_bench_in_the_registry_resolves():
    from bench.cli import BENCHES, resolve

    assert all(callable(resolve(name)) for name in BENCHES)
