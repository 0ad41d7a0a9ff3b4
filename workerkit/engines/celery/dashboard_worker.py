"""A Celery worker's side of the dashboard: the pause filter of its pop, and its presence.

Both live in the broker's Redis (workerkit/engines/redis_presence.py) and are reached through
their own client, apart from kombu's: the pause set is read by the consumer's loop thread (at
most every PAUSE_REFRESH s, pop.py), presences are written by the presence publisher.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from workerkit.engines.presence import PausedQueues

if TYPE_CHECKING:
    from workerkit.engines.redis_presence import RedisPresenceStore
    from workerkit.settings import Settings

__all__ = ("WorkerDashboard",)


class WorkerDashboard:
    """One worker main process's pause filter and presence publisher."""

    def __init__(self, settings: Settings, app: Any) -> None:
        self.settings = settings
        self.app = app
        self._store: RedisPresenceStore | None = None
        self.publisher: Any = None
        self.paused = PausedQueues(self._read_paused)

    def store(self) -> RedisPresenceStore:
        """The broker's presences and pauses (made at first use)."""
        if self._store is None:
            from workerkit.engines.celery.dashboard import presence_store

            self._store = presence_store(self.settings, self.app)
        return self._store

    def _read_paused(self) -> frozenset[str]:
        return self.store().paused_queues()

    def install_presence(self, events: Any) -> None:
        """Publish this worker's presence (the supervisor's record, sent through ``events``)."""
        try:  # TODO(lead): drop the guard once workerkit.engines.presence_publisher is merged
            from workerkit.engines.presence_publisher import (  # type: ignore[import-not-found,unused-ignore]
                install_presence,
            )
        except ImportError:
            return
        self.publisher = install_presence(events, self.store)

    def close(self) -> None:
        """At a clean exit: the presence record goes (else its TTL ends it)."""
        publisher, self.publisher = self.publisher, None
        if publisher is not None:
            with contextlib.suppress(Exception):
                publisher.close()
