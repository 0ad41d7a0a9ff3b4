"""The celery engine as the supervisor sees it: worker command, app timing, release after a kill.

Imports neither Celery nor kombu at module level: the supervisor holds this object for its
whole life, and loads the Celery app only to release after a kill
(:meth:`CeleryEngine.release_in_flight`). :meth:`CeleryEngine.app_timing` runs in ``workerkit
check`` and in the app check process (:mod:`workerkit.engines.appcheck`), never in the supervisor.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from workerkit.engines.attempt import release_each
from workerkit.engines.base import AppTiming
from workerkit.engines.celery.config import (
    celery_facts,
    check_worker_args,
    configure_app,
    load_celery_app,
    task_timings,
)

if TYPE_CHECKING:
    from workerkit.settings import Settings

__all__ = ("CeleryEngine",)

log = logging.getLogger("workerkit.engines.celery")


class CeleryEngine:
    """The celery engine (:class:`~workerkit.engines.base.Engine`)."""

    name = "celery"

    def __init__(self, worker_args: Sequence[str] = ()) -> None:
        self.worker_args = list(worker_args)
        self._app: Any = None
        self._loading = threading.Lock()  # prepare_release's thread and the release's

    def scheduler_command(self, settings: Settings) -> list[str]:
        """The scheduler process (``workerkit scheduler celery``), in a fresh interpreter."""
        return [sys.executable, "-m", "workerkit.engines.celery.scheduling"]

    def worker_command(self, settings: Settings) -> list[str]:
        """The Celery worker with workerkit inside, in a fresh interpreter."""
        return [sys.executable, "-m", "workerkit.engines.celery", *self.worker_args]

    def _load(self, settings: Settings) -> Any:
        with self._loading:
            if self._app is None:
                app = load_celery_app(settings.app)
                configure_app(app, settings)
                self._app = app
            return self._app

    def app_timing(self, settings: Settings) -> AppTiming:
        """The tasks' time limits and the app's overrides of workerkit's Celery defaults.

        Also where a missing or wrong app, and a ``celery worker`` option that does not exist,
        are refused: before the supervisor starts anything (in the app check process,
        :mod:`workerkit.engines.appcheck`).
        """
        app = load_celery_app(settings.app)
        check_worker_args(app, self.worker_args)
        facts = celery_facts(app)  # before configure_app fills in workerkit's values
        timings = task_timings(app)
        configure_app(app, settings)
        self._app = app
        return AppTiming(tasks=timings, celery=facts)

    def prepare_release(self, settings: Settings) -> None:
        """Load the Celery app ahead of a release: the supervisor calls this when a drain
        begins."""
        import workerkit.engines.celery.ledger  # noqa: F401

        self._load(settings)

    def release_in_flight(
        self, settings: Settings, refs: Sequence[Mapping[str, Any]], *, crashed: bool = False
    ) -> int:
        """Restore the messages of a worker that was killed (or died); return how many.

        A message is restored only while its lease is gone or still the dead worker's: one that
        was restored and redelivered since (its lease is another worker's) is left alone.
        """
        if not refs:
            return 0
        from workerkit.engines.celery.ledger import Ledger  # Celery and redis: only now

        ledger = Ledger(self._load(settings))

        def release(ref: Mapping[str, Any]) -> bool:
            tag, worker = ref.get("delivery_tag"), str(ref.get("worker") or "")
            if not tag:
                return False
            return ledger.restore(str(tag), owners=(worker,), crashed=crashed)

        try:
            return release_each(
                refs,
                release,
                log=log,
                give_up_on=(Exception,),
                give_up_message="cannot release a message; crash recovery will",
            ).released
        finally:
            ledger.close()
