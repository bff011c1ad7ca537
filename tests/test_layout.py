"""The package tree keeps its promises: who may import whom, no cycles, small pieces.

docs/architecture.md draws the tree; this test is what keeps the drawing
true. It reads the source with ``ast`` (nothing is imported), so it needs no
socket and runs in milliseconds.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "chatpair"

#: Top-level parts of chatpair and which other parts each may import.
#: ``cli`` sits on top of everything; ``errors`` and ``netutil`` at the bottom;
#: ``__init__`` is the package root (its ``__version__``).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "netutil": {"errors"},
    "proto": {"errors"},
    "server": {"__init__", "errors", "netutil", "proto", "cluster"},
    "client": {"__init__", "errors", "netutil", "proto"},
    "bench": {"__init__", "errors", "netutil", "proto", "client"},
    "cluster": {"__init__", "errors", "netutil", "proto"},
    "cli": {"errors", "netutil", "proto", "server", "client", "bench", "cluster", "__init__"},
    "__main__": {"cli"},
    "__init__": {"errors"},
}
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 250


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The chatpair modules ``name`` imports (at any depth: lazy imports count too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("chatpair"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module.startswith("chatpair"):
                continue
            for alias in node.names:  # "from chatpair.proto import frames" imports a module
                sub = f"{module}.{alias.name}"
                found.add(sub if sub in MODULES else module)
    found.discard(name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_tree(module: str) -> None:
    part = _part(module)
    allowed = ALLOWED[part] | {part}
    wrong = sorted(imp for imp in GRAPH[module] if _part(imp) not in allowed)
    assert not wrong, f"{module} ({part}/) may import {sorted(ALLOWED[part])} but imports {wrong}"


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt not in GRAPH:
                continue
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_proto_imports_nothing_of_chatpair_but_errors() -> None:
    for module, imports in GRAPH.items():
        if _part(module) == "proto":
            outside = sorted(i for i in imports if _part(i) not in ("proto", "errors"))
            assert not outside, f"{module} imports {outside}"


def test_only_cli_imports_click() -> None:
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "click" or n.startswith("click.") for n in names):
                assert module == "chatpair.cli", f"{module} imports click"


def test_only_cluster_imports_redis() -> None:
    """redis is the optional ``cluster`` extra: the core must import without it."""
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n.split(".")[0] in ("redis", "hiredis") for n in names):
                assert _part(module) == "cluster", f"{module} imports {names}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_small_modules_and_classes_with_docstrings(module: str) -> None:
    path = MODULES[module]
    source = path.read_text(encoding="utf-8")
    lines = source.count("\n")
    assert lines <= MAX_MODULE_LINES, f"{module} has {lines} lines (at most {MAX_MODULE_LINES})"
    tree = ast.parse(source)
    assert ast.get_docstring(tree), f"{module} has no docstring saying what lives there"
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"{module}.{node.name} has {size} lines (at most {MAX_CLASS_LINES})"
