"""Engines: how the supervisor starts a worker of each kind and releases its jobs.

Each engine lives in its own module, imported only when asked for, so that a deployment of one
engine needs none of the others' libraries installed.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from workerkit.errors import EngineUnavailable

if TYPE_CHECKING:
    from workerkit.engines.base import Engine

__all__ = ("ENGINE_CLASSES", "get_engine")

#: engine name -> (module, class, the pip extra that installs its libraries)
ENGINE_CLASSES: dict[str, tuple[str, str, str]] = {
    "sql": ("workerkit.engines.sql", "SqlEngine", "postgres"),
    "rq": ("workerkit.engines.rq", "RqEngine", "rq"),
    "celery": ("workerkit.engines.celery", "CeleryEngine", "celery"),
}


def get_engine(name: str, worker_args: Sequence[str] = ()) -> Engine:
    """The engine called ``name``, given the extra arguments for its worker.

    Raises :class:`~workerkit.errors.EngineUnavailable` when the name is unknown or the engine's
    libraries are not installed.
    """
    try:
        module_name, class_name, extra = ENGINE_CLASSES[name]
    except KeyError:
        known = ", ".join(ENGINE_CLASSES)
        raise EngineUnavailable(f"unknown engine {name!r}; expected one of {known}") from None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.startswith("workerkit"):
            raise EngineUnavailable(
                f"engine {name!r} is not available in this version of workerkit"
            ) from exc
        raise EngineUnavailable(
            f"engine {name!r} needs {exc.name!r}, which is not installed: "
            f"pip install 'workerkit[{extra}]'"
        ) from exc
    engine: Engine = getattr(module, class_name)(worker_args)
    return engine
