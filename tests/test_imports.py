"""The import graph of the two packages, read from the source with ``ast`` (nothing is imported):
``launcher`` imports ``mlctl``, never the other way round, and neither package has a cycle.

Every import counts wherever it sits: at module level, inside a function, under ``TYPE_CHECKING``
(a cycle that only the type checker closes is still two modules that need each other), and an
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name. A module of ``mlctl``
must not even name a ``launcher`` module in a string (a verbs table resolved by importlib, a Ray
hook path): the boundary is about what mlctl knows, not only about what it imports directly.

``import a.b.c`` is an edge to ``a.b.c`` only: that Python initialises the parent packages first is
what lets a package's ``__init__`` gather its submodules, and is not counted as a cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mlctl", "launcher")
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every .py under the packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The known module ``name`` is, or the longest known module it lies in (``pkg.mod.attr``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, str]]:
    """(imported module of the packages, line, how) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: list[tuple[str, int, str]] = []

    def add(name: str, line: int, how: str) -> None:
        target = _resolve(name, modules)
        if target is not None and target != module:
            found.append((target, line, how))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, path.name == "__init__.py")
            for alias in node.names:
                # `from pkg import mod` imports the submodule; `from mod import name` the module
                name = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                add(name, node.lineno, f"from {base} import {alias.name}")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                add(node.args[0].value, node.lineno, f"{called}({node.args[0].value!r})")
    return found


def launcher_names_in(path: Path) -> list[tuple[int, str]]:
    """(line, string) of every string literal in ``path`` that is a dotted name in ``launcher``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and _DOTTED.match(node.value)
        and node.value.split(".")[0] == "launcher"
    ]


def import_graph(root: Path = ROOT) -> dict[str, list[tuple[str, int, str]]]:
    modules = module_files(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, list[tuple[str, int, str]]], package: str) -> list[list[str]]:
    """The strongly connected components of more than one module among ``package``'s modules, each
    as one cycle through it (Tarjan's algorithm, then a path back to the start inside the component)."""
    nodes = [n for n in graph if n.split(".")[0] == package]
    succ = {n: sorted({t for t, _, _ in graph[n] if t.split(".")[0] == package}) for n in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
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
                components.append(sorted(comp))

    for v in nodes:
        if v not in index:
            visit(v)
    return [_cycle_through(comp, succ) for comp in components]


def _cycle_through(comp: list[str], succ: dict[str, list[str]]) -> list[str]:
    """A shortest cycle from the component's first module back to itself (breadth first)."""
    start, members = comp[0], set(comp)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in succ[v]:
            if w == start:
                return paths[v] + [start]
            if w in members and w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return comp  # unreachable for a strongly connected component


def _describe(cycle: list[str], graph) -> str:
    steps = []
    for a, b in zip(cycle, cycle[1:], strict=False):
        line, how = next((line, how) for t, line, how in graph[a] if t == b)
        steps.append(f"{a} -> {b} ({how}, line {line})")
    return "; ".join(steps)


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_walk_sees_both_packages_and_function_level_imports(graph):
    assert "mlctl.config" in graph and "launcher.ray_train" in graph
    # launcher.ray_train imports launcher.cluster inside launch(): a function-level import counts
    assert "launcher.cluster" in {t for t, _, _ in graph["launcher.ray_train"]}


def test_mlctl_never_imports_launcher(graph):
    modules = module_files()
    bad = [
        f"{m} line {line}: {how}"
        for m, edges in graph.items()
        if m.startswith("mlctl")
        for t, line, how in edges
        if t.startswith("launcher")
    ]
    bad += [
        f"{m} line {line}: names {text!r}"
        for m, path in modules.items()
        if m.startswith("mlctl")
        for line, text in launcher_names_in(path)
    ]
    assert not bad, "mlctl must not depend on launcher (launcher imports mlctl):\n" + "\n".join(bad)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(graph, package):
    found = cycles(graph, package)
    assert not found, f"import cycles in {package}:\n" + "\n".join(_describe(c, graph) for c in found)
