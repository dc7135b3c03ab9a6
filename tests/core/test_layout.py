"""The runtime's rooms: imports flow one way (commands -> orchestration -> federation -> training ->
model/secagg/privacy/trust -> spec and the foundations), and no module imports itself back through others.

Read from the source (every `import`, also those inside functions), so a new cycle or an import
against the flow fails here before it fails anyone at run time."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "trainer_image" / "fedtune"

# Lower layers never import higher ones; packages of one layer do not import each other.
LAYERS: list[set[str]] = [
    {"__init__", "spec", "files", "logs", "exits", "roles", "procstat", "procctl"},
    {"secagg", "privacy", "trust", "model"},
    {"train"},
    {"federation"},
    {"local", "tools"},
    {"cli"},
    {"__main__"},
]
LAYER = {package: level for level, packages in enumerate(LAYERS) for package in packages}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py") if "proto" not in p.parts}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The fedtune modules `name` imports, resolved to modules (`from fedtune.x import y` is module x.y
    when that exists, else x)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fedtune"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *filter(None, [base])])
            if not base.startswith("fedtune"):
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    return found


def test_every_room_has_a_layer() -> None:
    assert {room(m) for m in modules()} <= set(LAYER), "a new package: give it a layer in LAYERS"


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_imports_flow_one_way() -> None:
    against = [f"{src} imports {dst}" for src, dsts in graph().items() for dst in dsts
               if room(src) != room(dst) and LAYER[room(dst)] >= LAYER[room(src)]]
    assert against == []


def test_each_room_says_what_it_owns() -> None:
    for init in ROOT.glob("*/__init__.py"):
        if init.parent.name != "proto":
            assert ast.get_docstring(ast.parse(init.read_text())), f"{init.parent.name}/__init__.py has no docstring"


@pytest.mark.parametrize("edges, expected", [
    ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
])
def test_the_cycle_finder_finds_cycles(edges: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert cycles(edges) == expected
