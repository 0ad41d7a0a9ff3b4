"""A Celery worker's side of the dashboard: the pause filter of its pop, and its presence.

Both live in the broker's Redis (workerkit/engines/redis_presence.py) and are reached through
their own client, apart from kombu's: the pause set is read by the consumer's loop thread (at
most every PAUSE_REFRESH s, pop.py), presences are written by the presence publisher.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from workerkit.engines.presence import PausedQueues
from workerkit.engines.presence_publisher import install_presence
from workerkit.engines.redis_presence import RedisPresenceStore

if TYPE_CHECKING:
    from workerkit.settings import Settings

__all__ = ("WorkerDashboard", "broker_client", "key_prefix", "presence_store")


def broker_client(url: str, *, timeout: float = 2.0) -> Any:
    """A redis-py client of the broker, apart from kombu's (whose client prefixes some keys)."""
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=timeout)


def key_prefix(app: Any) -> str:
    """kombu's ``global_keyprefix`` of the app's broker ("" without one)."""
    options = app.conf.broker_transport_options or {}
    return str(options.get("global_keyprefix") or "")


def presence_store(settings: Settings, app: Any = None) -> RedisPresenceStore:
    """The presences and pauses of the app's broker Redis (kombu's key prefix in front)."""
    if app is None:
        from workerkit.engines.celery.config import configure_app, load_celery_app

        app = load_celery_app(settings.app)
        configure_app(app, settings)
    return RedisPresenceStore(broker_client(str(app.conf.broker_url)), key_prefix(app))


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
            self._store = presence_store(self.settings, self.app)
        return self._store

    def _read_paused(self) -> frozenset[str]:
        return self.store().paused_queues()

    def install_presence(self, events: Any) -> None:
        """Publish this worker's presence (the supervisor's record, sent through ``events``)."""
        self.publisher = install_presence(events, self.store)

    def close(self) -> None:
        """At a clean exit: the presence record goes (else its TTL ends it)."""
        publisher, self.publisher = self.publisher, None
        if publisher is not None:
            with contextlib.suppress(Exception):
                publisher.close()
