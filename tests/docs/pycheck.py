"""What a Python fragment of the docs must get right even when it cannot run on its own.

A fragment uses names its page defined earlier (``app``, ``render``), so it is not executed;
but every ``workerkit`` name it imports or reaches exists, and every call to a workerkit callable
(``workerkit.batches(...)``, ``RqApp(...)``, ``@app.task(...)`` on an ``app`` the fragment made)
binds its arguments to the real signature: a renamed function, class or keyword fails.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from types import ModuleType
from typing import Any

__all__ = ("problems_of",)

_MISSING = object()


class _Checker(ast.NodeVisitor):
    def __init__(self) -> None:
        self.names: dict[str, Any] = {}  # a name bound to a workerkit module, object or class
        self.instances: dict[str, type] = {}  # a name bound to an instance of a workerkit class
        self.problems: list[str] = []

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] != "workerkit":
                continue
            try:
                module = importlib.import_module(alias.name)
            except ImportError as exc:
                self.problems.append(f"line {node.lineno}: import {alias.name}: {exc}")
                continue
            if alias.asname:
                self.names[alias.asname] = module
            else:
                self.names["workerkit"] = importlib.import_module("workerkit")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if not node.module or node.module.split(".")[0] != "workerkit" or node.level:
            return
        try:
            module = importlib.import_module(node.module)
        except ImportError as exc:
            self.problems.append(f"line {node.lineno}: from {node.module}: {exc}")
            return
        for alias in node.names:
            value = getattr(module, alias.name, _MISSING)
            if value is _MISSING:
                self.problems.append(f"line {node.lineno}: {node.module} has no {alias.name}")
            else:
                self.names[alias.asname or alias.name] = value

    def _resolve(self, node: ast.expr) -> Any:
        """The workerkit object an expression names, or _MISSING when it names none."""
        if isinstance(node, ast.Name):
            return self.names.get(node.id, _MISSING)
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id in self.instances:
                return self._instance_attribute(self.instances[node.value.id], node)
            owner = self._resolve(node.value)
            if owner is _MISSING:
                return _MISSING
            value = getattr(owner, node.attr, _MISSING)
            if value is _MISSING:
                shown = getattr(owner, "__name__", repr(owner))
                self.problems.append(f"line {node.lineno}: {shown} has no attribute {node.attr}")
            return value
        return _MISSING

    def _instance_attribute(self, cls: type, node: ast.Attribute) -> Any:
        """A method of an instance's class, checked to exist; _MISSING for any other attribute."""
        declared = {name for klass in cls.__mro__ for name in getattr(klass, "__annotations__", {})}
        if node.attr not in declared and not hasattr(cls, node.attr):
            self.problems.append(f"line {node.lineno}: {cls.__name__} has no attribute {node.attr}")
            return _MISSING
        value = inspect.getattr_static(cls, node.attr, _MISSING)
        return value if inspect.isfunction(value) else _MISSING

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        if isinstance(node.value, ast.Call) and len(node.targets) == 1:
            made = self._resolve(node.value.func)
            target = node.targets[0]
            if inspect.isclass(made) and isinstance(target, ast.Name):
                self.instances[target.id] = made

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        func = self._resolve(node.func)
        if func is _MISSING or isinstance(func, ModuleType) or not callable(func):
            return
        if any(isinstance(arg, ast.Starred) for arg in node.args) or any(
            keyword.arg is None for keyword in node.keywords
        ):
            return  # *args or **kwargs: nothing to bind
        owner = node.func.value if isinstance(node.func, ast.Attribute) else None
        bound_method = isinstance(owner, ast.Name) and owner.id in self.instances
        try:
            signature = inspect.signature(func)
        except (TypeError, ValueError):
            return
        args: list[object] = [None] * (len(node.args) + (1 if bound_method else 0))
        try:
            signature.bind_partial(*args, **{kw.arg: None for kw in node.keywords if kw.arg})
        except TypeError as exc:
            name = getattr(func, "__qualname__", repr(func))
            self.problems.append(f"line {node.lineno}: {name}{signature}: {exc}")


def problems_of(source: str) -> list[str]:
    """What is wrong with a Python fragment: a syntax error, or a workerkit name or call."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        return [f"line {exc.lineno}: {exc.msg}"]
    checker = _Checker()
    checker.visit(tree)
    return checker.problems
