"""The layout's rules, checked on the source: no import cycles, and the contracts between parts.

docs/contributing/architecture.md states them. Imports inside functions count (a deferred import
still ties two modules together); imports under ``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

import workerkit

pytestmark = pytest.mark.unit

PACKAGE_DIR = Path(workerkit.__file__).parent
ENGINE_LIBRARIES = (
    "alembic",
    "billiard",
    "celery",
    "kombu",
    "psycopg",
    "redis",
    "rq",
    "sqlalchemy",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
        if "migrations" not in path.parts
    }


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST, *, top_level_only: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        nested = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        if not (top_level_only and nested):
            yield from _import_nodes(node, top_level_only=top_level_only)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = _modules()[module].name == "__init__.py"
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imported_names(module: str, *, top_level_only: bool = False) -> set[str]:
    """Every module ``module`` imports (a ``from a import b`` of a submodule names ``a.b``)."""
    tree = ast.parse(_modules()[module].read_text(), filename=str(_modules()[module]))
    found: set[str] = set()
    for node in _import_nodes(tree, top_level_only=top_level_only):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        source = _resolve(module, node)
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            found.add(submodule if submodule in _modules() else source)
    return found


def _internal_graph() -> dict[str, set[str]]:
    return {
        module: {name for name in imported_names(module) if name in _modules()} - {module}
        for module in _modules()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_module_walk_sees_the_engines() -> None:
    assert {"workerkit.cli", "workerkit.engines.sql", "workerkit.engines.rq"} <= set(_modules())


def test_no_import_cycles() -> None:
    assert _cycles(_internal_graph()) == []


def test_a_cycle_is_found_when_there_is_one() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_engines_never_import_the_supervisor() -> None:
    offenders = {
        module: sorted(
            name for name in imported_names(module) if name.startswith("workerkit.supervisor")
        )
        for module in _modules()
        if module.startswith("workerkit.engines")
    }
    assert {module: names for module, names in offenders.items() if names} == {}


def test_production_code_never_imports_the_test_doubles_module() -> None:
    importers = [
        module
        for module in _modules()
        if module != "workerkit.testing" and "workerkit.testing" in imported_names(module)
    ]
    assert importers == []


def test_importing_the_supervisor_loads_no_engine_library() -> None:
    probe = (
        "import sys, workerkit.supervisor, workerkit.cli; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {ENGINE_LIBRARIES!r}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_the_engines_as_the_supervisor_holds_them_load_no_engine_library() -> None:
    # What `workerkit run ENGINE` imports before it supervises: each engine's class (its
    # worker command), the app check's parent side and the runner. The app itself, which does
    # import the engine's library, is loaded in the app check's own process.
    probe = (
        "import sys, workerkit.cli, workerkit.supervisor.runner, workerkit.engines.appcheck\n"
        "from workerkit.engines import ENGINE_CLASSES, get_engine\n"
        "from workerkit.settings import load_settings\n"
        "settings = load_settings({'redis_url': 'redis://127.0.0.1:1/0'})\n"
        "for name in ENGINE_CLASSES: get_engine(name).worker_command(settings)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {ENGINE_LIBRARIES!r}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 80


def test_modules_and_functions_stay_small_enough_to_read() -> None:
    too_long: list[str] = []
    for module, path in _modules().items():
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{module}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{module}.{node.name}: {length} lines")
    assert too_long == []
