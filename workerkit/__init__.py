"""workerkit: a graceful queue-worker runtime for Celery, RQ and SQL-backed workers.

The public names are imported from their modules on first use (PEP 562): ``workerkit run``
imports this package before it spawns the worker, and its supervisor needs none of ``App``'s
machinery (idempotency, the job context: ~0.05 s of the start).
"""

from __future__ import annotations

import typing as _typing

from workerkit.engines import lazy as _lazy

if _typing.TYPE_CHECKING:
    from workerkit.app import App as App
    from workerkit.app import Task as Task
    from workerkit.errors import ConfigurationError as ConfigurationError
    from workerkit.errors import LeaseLost as LeaseLost
    from workerkit.errors import NoCurrentJob as NoCurrentJob
    from workerkit.errors import WorkerkitError as WorkerkitError
    from workerkit.idempotency import idempotent as idempotent
    from workerkit.iteration import Batch as Batch
    from workerkit.iteration import batches as batches
    from workerkit.iteration import checkpointed as checkpointed
    from workerkit.job import JobContext as JobContext
    from workerkit.job import current_job as current_job
    from workerkit.job import current_job_or_none as current_job_or_none
    from workerkit.settings import Settings as Settings
    from workerkit.settings import load_settings as load_settings

__version__ = "0.1.0"

__all__ = (
    "App",
    "Batch",
    "ConfigurationError",
    "JobContext",
    "LeaseLost",
    "NoCurrentJob",
    "Settings",
    "Task",
    "WorkerkitError",
    "__version__",
    "batches",
    "checkpointed",
    "current_job",
    "current_job_or_none",
    "idempotent",
    "load_settings",
)

#: public name -> the module that defines it (imported on first access).
_HOMES: _typing.Final = {
    "App": "app",
    "Task": "app",
    "ConfigurationError": "errors",
    "LeaseLost": "errors",
    "NoCurrentJob": "errors",
    "WorkerkitError": "errors",
    "idempotent": "idempotency",
    "Batch": "iteration",
    "batches": "iteration",
    "checkpointed": "iteration",
    "JobContext": "job",
    "current_job": "job",
    "current_job_or_none": "job",
    "Settings": "settings",
    "load_settings": "settings",
}


# Hidden from type checkers: they see the imports above, and flag a misspelled name.
if not _typing.TYPE_CHECKING:

    def __getattr__(name: str) -> _typing.Any:
        return _lazy.lazy_attribute(__name__, _HOMES, globals(), name)


def __dir__() -> list[str]:
    return _lazy.lazy_dir(globals(), __all__)
