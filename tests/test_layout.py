"""The package's shape: no import circles (function-level imports included), and a top level that holds
only the entry points, packages and the few modules that stand alone."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sdeflow"
#: The modules at the top of sdeflow/ besides packages, each standing alone for the reason given.
TOP_LEVEL = {
    "__init__": "the public names",
    "__main__": "python -m sdeflow",
    "cli": "the command line's entry point (its commands live in commands/)",
    "model": "the model: a network seen through a parameterization, which everything else takes",
    "config": "the model configuration that every checkpoint records, and build_model",
    "plotting": "figures, for every layer that draws",
    "utils": "the argument rules (check_*) and configuration fields every layer shares",
}


def _modules() -> dict[str, tuple[Path, bool]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def import_graph() -> dict[str, set[str]]:
    """module → the sdeflow modules it imports, at the top or inside a function. Importing a.b.c runs
    the __init__ of a.b first, so that is an edge too, unless the importer lives inside a.b (its
    packages are being imported already)."""
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        here = name.split(".") if is_package else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                parts = target.split(".")
                for k in range(1, len(parts) + 1):
                    module = ".".join(parts[:k])
                    inside = name == module or name.startswith(module + ".")
                    if module in modules and not inside and (k == len(parts) or modules[module][1]):
                        graph[name].add(module)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles_counting_function_level_imports():
    assert circles(import_graph()) == []


def test_the_checker_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


def test_the_top_level_holds_packages_and_the_named_modules_only():
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    assert modules == set(TOP_LEVEL), modules ^ set(TOP_LEVEL)
    for package in (p for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")):
        init = package / "__init__.py"
        assert init.exists() and ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), package.name
