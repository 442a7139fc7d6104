"""The package's modules import each other without circles, counting imports inside functions
too: every ``import`` / ``from ... import`` of a package module is an edge, wherever it is."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import lightning_shampoo4

ROOT = Path(lightning_shampoo4.__file__).parent
PACKAGE = "lightning_shampoo4"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join((PACKAGE, *parts))] = path
    return out


MODULES = _modules()


def _resolve(module: str, path: Path, level: int, name: str | None) -> str:
    """The absolute name of a relative import in ``module`` (a package's ``__init__`` is its own base)."""
    base = module.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _edges(module: str, path: Path) -> set[str]:
    """The package modules ``module`` imports, anywhere in its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node.level, node.module) if node.level else node.module or ""
            # ``from . import x`` imports module x; ``from .m import name`` imports module m
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != module and t != PACKAGE:  # the root package only re-exports
                found.add(t)
    return found


GRAPH = {m: _edges(m, p) for m, p in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_function_level_imports():
    assert "lightning_shampoo4.module" in GRAPH["lightning_shampoo4.recipes.config"]  # inside build_module
    assert "lightning_shampoo4.optim.settings" in GRAPH["lightning_shampoo4.optim.shampoo"]


def test_no_import_circles():
    assert _cycles() == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports_on_its_own(module):
    if module.endswith("__main__"):
        pytest.skip("runs the command")
    importlib.import_module(module)
