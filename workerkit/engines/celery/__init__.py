"""The celery engine: a Celery worker on Redis, with a bounded, lossless shutdown.

``workerkit run celery --app MODULE:APP [-- celery worker options]`` starts this package's
worker (``python -m workerkit.engines.celery``, see :mod:`.worker`) as the supervisor's child;
:class:`CeleryEngine` (:mod:`.engine`) is what the supervisor sees. Names are imported on first
use, so that the supervisor never loads Celery. docs/engines/celery.md is the design: the safe
defaults, the drain and release, crash recovery within W, attempts and fencing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from workerkit.engines.lazy import lazy_attribute

if TYPE_CHECKING:
    from workerkit.engines.celery.config import celery_facts as celery_facts
    from workerkit.engines.celery.config import configure_app as configure_app
    from workerkit.engines.celery.config import load_celery_app as load_celery_app
    from workerkit.engines.celery.config import task_timings as task_timings
    from workerkit.engines.celery.config import worker_argv as worker_argv
    from workerkit.engines.celery.engine import CeleryEngine as CeleryEngine
    from workerkit.engines.celery.ledger import CRASHES_HEADER as CRASHES_HEADER
    from workerkit.engines.celery.ledger import GEN_HEADER as GEN_HEADER
    from workerkit.engines.celery.ledger import KEY_PREFIX as KEY_PREFIX
    from workerkit.engines.celery.ledger import Generation as Generation
    from workerkit.engines.celery.ledger import Ledger as Ledger
    from workerkit.engines.celery.task import DEFAULT_MAX_ATTEMPTS as DEFAULT_MAX_ATTEMPTS
    from workerkit.engines.celery.task import AttemptsExhausted as AttemptsExhausted
    from workerkit.engines.celery.task import wrap_tasks as wrap_tasks
    from workerkit.engines.celery.worker import main as main

__all__ = (
    "CRASHES_HEADER",
    "DEFAULT_MAX_ATTEMPTS",
    "GEN_HEADER",
    "KEY_PREFIX",
    "AttemptsExhausted",
    "CeleryEngine",
    "Generation",
    "Ledger",
    "celery_facts",
    "configure_app",
    "load_celery_app",
    "main",
    "task_timings",
    "worker_argv",
    "wrap_tasks",
)

#: public name -> the module that defines it (imported on first access).
_HOMES: Final = {
    "CRASHES_HEADER": "ledger",
    "DEFAULT_MAX_ATTEMPTS": "task",
    "GEN_HEADER": "ledger",
    "KEY_PREFIX": "ledger",
    "AttemptsExhausted": "task",
    "CeleryEngine": "engine",
    "Generation": "ledger",
    "Ledger": "ledger",
    "celery_facts": "config",
    "configure_app": "config",
    "load_celery_app": "config",
    "main": "worker",
    "task_timings": "config",
    "worker_argv": "config",
    "wrap_tasks": "task",
}


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _HOMES, globals(), name)
