"""Importing the user's application from a ``MODULE:ATTRIBUTE`` string."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from workerkit.errors import AppImportError

__all__ = ("import_app",)


def import_app(spec: str) -> Any:
    """The object named by ``spec`` (``package.module:attribute``, attribute may be dotted).

    The working directory is put on ``sys.path`` first, as ``celery -A`` and ``rq worker`` do,
    so ``--app tasks:app`` finds ``./tasks.py``.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise AppImportError(
            f"--app / WORKERKIT_APP must look like MODULE:ATTRIBUTE (e.g. 'myproject.tasks:app'), "
            f"got {spec!r}"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AppImportError(
            f"--app {spec!r}: cannot import module {module_name!r}: {exc}"
        ) from exc
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise AppImportError(
                f"--app {spec!r}: module {module_name!r} has no attribute {attribute!r}"
            ) from None
    return target
