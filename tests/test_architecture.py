"""The layout tells the architecture: checked by reading every module's imports (an AST walk,
function-level and ``TYPE_CHECKING`` imports included), without importing anything.

- only :mod:`connector.store` sees a database driver or SQLAlchemy;
- the pure core (the Treez model, the planner, the mapping engine) imports no edge;
- the receiver runs on narrow ports: nothing it imports leads to the service, the pipeline,
  the workers or reconciliation;
- the package's modules import each other without a circle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "connector"
DATABASE = ("sqlalchemy", "sqlite3", "psycopg", "psycopg_pool", "alembic")
CORE = ("connector.treez", "connector.planner", "connector.mapping")
EDGES = (
    "connector.store",
    "connector.delivery",
    "connector.receiver",
    "connector.service",
    "connector.pipeline",
    "connector.reconcile",
    "connector.treez_api",
    "httpx",
    "fastapi",
    "starlette",
)


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _walk(node: ast.AST, *, type_checking: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    for child in ast.iter_child_nodes(node):
        if not type_checking and _is_type_checking(child):
            assert isinstance(child, ast.If)
            for other in child.orelse:
                yield from _walk(other, type_checking=type_checking)
            continue
        yield from _walk(child, type_checking=type_checking)


@cache
def imports(module: str, *, type_checking: bool = True) -> frozenset[str]:
    """Every name ``module`` imports, absolute: ``a.b`` and, for ``from a.b import c``, also
    ``a.b.c`` (which may be a submodule). ``type_checking``: count imports made only for
    the type checker (a dependency all the same) or only those that run."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _walk(ast.parse(path.read_text()), type_checking=type_checking):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        found.add(base)
        found.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(found)


def _internal(module: str, *, type_checking: bool) -> set[str]:
    return {m for m in imports(module, type_checking=type_checking) if m in MODULES}


def reachable(start: str, *, type_checking: bool = True) -> set[str]:
    """The package's modules that importing ``start`` may import, directly or not."""
    seen, todo = {start}, [start]
    while todo:
        for module in _internal(todo.pop(), type_checking=type_checking):
            if module not in seen:
                seen.add(module)
                todo.append(module)
    return seen


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_walk_sees_every_kind_of_import() -> None:
    """The checks below are only as good as the walk: function-level, relative and
    ``TYPE_CHECKING`` imports are all found."""
    assert "sqlalchemy" in imports("connector.store.admin")
    assert "connector.service" in imports("connector.pipeline_child")
    assert "connector.store.sqlite" in imports("connector.store")  # inside open_store
    assert "connector.config" in imports("connector.receiver")  # under TYPE_CHECKING
    assert "connector.config" not in imports("connector.receiver", type_checking=False)


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if not _within(m, ("connector.store",)))
)
def test_no_module_outside_the_store_imports_a_database(module: str) -> None:
    found = sorted(m for m in imports(module) if _within(m, DATABASE))
    assert not found, f"{module} imports {found}: only connector.store may"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _within(m, CORE)))
def test_the_core_imports_no_edge(module: str) -> None:
    direct = {m for m in imports(module) if _within(m, EDGES)}
    through = {m for m in reachable(module) if _within(m, EDGES)}
    assert not direct | through, f"{module} reaches {sorted(direct | through)}"


def test_the_receiver_does_not_reach_the_service() -> None:
    """The receiver takes narrow ports (connector.receiver.ReceiverPorts): nothing it
    imports, even for the type checker, leads to the service, the pipeline or its parts."""
    found = reachable("connector.receiver")
    assert not found & {
        "connector.service",
        "connector.pipeline",
        "connector.pipeline_process",
        "connector.pipeline_child",
        "connector.reconcile",
        "connector.delivery.worker",
    }, sorted(found)


def test_the_intake_uses_the_inbox_port_only() -> None:
    """The group committer needs the store's Inbox port, not an adapter."""
    store = {m for m in imports("connector.intake") if _within(m, ("connector.store",))}
    assert store
    assert all(_within(m, ("connector.store.abc",)) for m in store), sorted(store)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_runs_in_a_circle() -> None:
    """Imports that run (function-level ones included; ``TYPE_CHECKING`` ones left out)."""
    graph = {m: _internal(m, type_checking=False) for m in MODULES}
    assert _cycles(graph) == []
