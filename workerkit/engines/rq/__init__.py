"""The rq engine: graceful RQ workers that release, resume and recover in seconds.

``workerkit run rq --app myproject.rq_app:app --queues default`` runs an RQ worker (a subclass of
RQ's own, :class:`Worker` or :class:`SimpleWorker`) under the supervisor; the engine's own
arguments are in :mod:`workerkit.engines.rq.options`. This module is the facade: every public
name, imported on first use, so that the supervisor, which needs only :class:`RqEngine`
(:mod:`.engine`), never loads rq or redis. How it works: docs/engines/rq.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from workerkit.engines.lazy import lazy_attribute

if TYPE_CHECKING:
    from workerkit.engines.rq.engine import RqEngine as RqEngine
    from workerkit.engines.rq.jobs import META_KEY as META_KEY
    from workerkit.engines.rq.jobs import WorkerkitJob as WorkerkitJob
    from workerkit.engines.rq.tasks import DEFAULT_MAX_ATTEMPTS as DEFAULT_MAX_ATTEMPTS
    from workerkit.engines.rq.tasks import RqApp as RqApp
    from workerkit.engines.rq.tasks import RqTaskInfo as RqTaskInfo
    from workerkit.engines.rq.tasks import TaskNotAllowed as TaskNotAllowed
    from workerkit.engines.rq.worker import SimpleWorker as SimpleWorker
    from workerkit.engines.rq.worker import Worker as Worker
    from workerkit.engines.rq.worker import main as main

__all__ = (
    "DEFAULT_MAX_ATTEMPTS",
    "META_KEY",
    "RqApp",
    "RqEngine",
    "RqTaskInfo",
    "SimpleWorker",
    "TaskNotAllowed",
    "Worker",
    "WorkerkitJob",
    "main",
)

#: public name -> the module that defines it (imported on first access).
_HOMES: Final = {
    "DEFAULT_MAX_ATTEMPTS": "tasks",
    "META_KEY": "jobs",
    "RqApp": "tasks",
    "RqEngine": "engine",
    "RqTaskInfo": "tasks",
    "SimpleWorker": "worker",
    "TaskNotAllowed": "tasks",
    "Worker": "worker",
    "WorkerkitJob": "jobs",
    "main": "worker",
}


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _HOMES, globals(), name)
