"""Engines: how the supervisor starts a worker of each kind and releases its jobs.

Each engine lives in its own module, imported only when asked for, so that a deployment of one
engine needs none of the others' libraries installed. The engines' own command-line options are
declared here (:data:`ENGINE_OPTIONS`) for the same reason: ``workerkit run rq --help`` lists
them without importing rq.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from workerkit.errors import EngineUnavailable

if TYPE_CHECKING:
    from workerkit.engines.base import Engine

__all__ = ("ENGINE_CLASSES", "ENGINE_OPTIONS", "EngineOption", "get_engine")

#: engine name -> (module, class, the pip extra that installs its libraries)
ENGINE_CLASSES: dict[str, tuple[str, str, str]] = {
    "sql": ("workerkit.engines.sql.engine", "SqlEngine", "postgres"),
    "rq": ("workerkit.engines.rq.engine", "RqEngine", "rq"),
    "celery": ("workerkit.engines.celery.engine", "CeleryEngine", "celery"),
}

#: engine name -> the libraries it cannot run without (looked for, not imported, by get_engine:
#: the engine classes import them only when they need them).
_LIBRARIES: Final[Mapping[str, tuple[str, ...]]] = {
    "sql": ("sqlalchemy", "alembic"),
    "rq": ("rq", "redis"),
    "celery": ("celery", "kombu"),
}


@dataclass(frozen=True)
class EngineOption:
    """One option of an engine's own (not a setting): its flag, help, choices and default."""

    flag: str
    help: str
    choices: tuple[str, ...] = ()
    default: str | None = None
    metavar: str | None = None
    is_flag: bool = False

    @property
    def dest(self) -> str:
        """The option's name as a Python identifier (``--worker-class`` -> ``worker_class``)."""
        return self.flag.lstrip("-").replace("-", "_")


#: engine name -> its own options, given to ``workerkit run ENGINE`` after the settings.
ENGINE_OPTIONS: Final[Mapping[str, tuple[EngineOption, ...]]] = {
    "sql": (),
    "rq": (
        EngineOption(
            "--worker-class",
            "forking: RQ's Worker, a work horse forked per job (RQ's default); simple: RQ's "
            "SimpleWorker, jobs run in the worker process.",
            choices=("forking", "simple"),
            default="forking",
        ),
        EngineOption(
            "--serializer",
            "How jobs are decoded: json; safe-pickle (pickle limited to basic types and the "
            "app's tasks, to drain a queue filled by producers on RQ's defaults); pickle (trusted "
            "writers only). Default: $WORKERKIT_RQ_SERIALIZER, else json (docs/engines/rq.md).",
            choices=("json", "safe-pickle", "pickle"),
        ),
        EngineOption(
            "--url",
            "The Redis URL, spelled as `rq worker` does (default: the redis_url setting).",
            metavar="URL",
        ),
        EngineOption(
            "--with-scheduler",
            "Also run RQ's scheduler (enqueue_in, enqueue_at, Retry(interval=...)).",
            is_flag=True,
        ),
    ),
    # Options workerkit does not know go to `celery worker` (checked before anything starts).
    "celery": (),
}


def _installed(library: str) -> bool:
    """Whether ``library`` can be imported (found, not imported)."""
    if library in sys.modules:
        return True
    try:
        return importlib.util.find_spec(library) is not None
    except ValueError:  # a module object without a spec: there, whatever it is
        return True


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
        for library in _LIBRARIES.get(name, ()):
            if not _installed(library):
                raise ModuleNotFoundError(f"No module named {library!r}", name=library)
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
