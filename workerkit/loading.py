"""Importing the user's application: ``MODULE:ATTRIBUTE``, or what ``celery -A`` accepts.

Whatever goes wrong while the user's module is imported (an ImportError, but as often a
``KeyError: 'DATABASE_URL'`` from a settings module) becomes one :class:`AppImportError` line
naming the app, the exception and where it was raised; the traceback is logged at DEBUG.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import sysconfig
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from workerkit.errors import AppImportError

__all__ = ("find_app", "import_app", "import_app_module")

log = logging.getLogger(__name__)

_STDLIB = sysconfig.get_paths()["stdlib"]


def import_app(spec: str) -> Any:
    """The object named by ``spec`` (``package.module:attribute``, attribute may be dotted).

    The working directory is put on ``sys.path`` first, as ``celery -A`` and ``rq worker`` do,
    so ``--app tasks:app`` finds ``./tasks.py``.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not _dotted(module_name) or not _dotted(attribute):
        raise AppImportError(
            f"--app / WORKERKIT_APP must look like MODULE:ATTRIBUTE (e.g. 'myproject.tasks:app'), "
            f"got {spec!r}"
        )
    return _attribute(spec, import_app_module(spec, module_name), attribute)


def find_app(spec: str, app_type: type) -> Any:
    """What ``celery -A spec`` finds (Celery's ``celery.app.utils.find_app``, step by step).

    ``module:attribute``; ``module.attribute``; or a module, in which the app is its ``app`` or
    ``celery`` attribute, else (a package) its ``celery`` submodule searched the same way, else
    the one ``app_type`` instance among its names. The caller checks the type of what is found.
    """
    module_name, sep, attribute = spec.rpartition(":")
    if sep:
        if not _dotted(module_name) or not _dotted(attribute):
            raise AppImportError(_bad_spec(spec))
        return _attribute(spec, import_app_module(spec, module_name), attribute)
    if not _dotted(spec):
        raise AppImportError(_bad_spec(spec))
    parent, _, name = spec.rpartition(".")
    if parent:
        found = getattr(import_app_module(spec, parent), name, None)
        if found is not None:
            return _app_in(spec, found, app_type) if isinstance(found, ModuleType) else found
    return _app_in(spec, import_app_module(spec, spec), app_type)


def _app_in(spec: str, module: ModuleType, app_type: type) -> Any:
    for name in ("app", "celery"):
        found = getattr(module, name, None)
        if found is not None and not isinstance(found, ModuleType):
            return found
    submodule = f"{module.__name__}.celery"
    if hasattr(module, "__path__") and _exists(submodule):
        return _app_in(spec, import_app_module(spec, submodule), app_type)
    for value in vars(module).values():
        if isinstance(value, app_type):
            return value
    package = f", no submodule {submodule!r}" if hasattr(module, "__path__") else ""
    raise AppImportError(
        f"--app {spec!r}: module {module.__name__!r} has no app: no attribute 'app' or "
        f"'celery'{package}, and no {app_type.__name__} instance in it; give "
        "MODULE:ATTRIBUTE (e.g. 'proj.celery:app')"
    )


def _exists(module_name: str) -> bool:
    try:
        return importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):
        return False


def import_app_module(spec: str, module_name: str) -> ModuleType:
    """Import ``module_name`` for ``--app spec``; any failure is one AppImportError line.

    The working directory comes first on ``sys.path`` (as with ``celery -A`` and ``rq worker``).
    """
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except Exception as exc:
        log.debug(
            "importing the app %r failed",
            spec,
            exc_info=True,
            extra={"event": "app_import_failed", "app": spec},
        )
        if isinstance(exc, ModuleNotFoundError) and exc.name == module_name:
            raise AppImportError(
                f"--app {spec!r}: no module named {module_name!r} (looked for in the working "
                "directory, then sys.path)"
            ) from exc
        raise AppImportError(
            f"--app {spec!r}: importing {module_name!r} raised "
            f"{type(exc).__name__}: {_one_line(exc)}{_where(exc)}; the traceback is logged "
            "with --log-level debug"
        ) from exc


def _attribute(spec: str, module: ModuleType, attribute: str) -> Any:
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise AppImportError(
                f"--app {spec!r}: module {module.__name__!r} has no attribute {attribute!r}"
            ) from None
    return target


def _dotted(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))


def _bad_spec(spec: str) -> str:
    hint = ""
    if "/" in spec or spec.endswith(".py"):
        hint = " (a module name, not a file path)"
    return (
        f"--app {spec!r} is not an app{hint}: give what `celery -A` takes, a module "
        "('proj'), module.attribute ('proj.celery.app') or module:attribute ('proj.celery:app')"
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else "(no message)"


def _where(exc: BaseException) -> str:
    """`` at FILE:LINE``: the deepest frame in the working directory, else outside Python's own."""
    cwd = Path.cwd()
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if not frame.filename.startswith(("<", _STDLIB + os.sep))
    ]
    own = [frame for frame in frames if Path(frame.filename).is_relative_to(cwd)]
    chosen = own or frames
    if not chosen:
        return ""
    path = Path(chosen[-1].filename)
    shown = path.relative_to(cwd) if path.is_relative_to(cwd) else path
    return f" at {shown}:{chosen[-1].lineno}"
