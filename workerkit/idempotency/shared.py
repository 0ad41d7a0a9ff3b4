"""The default idempotency store of each engine: one per kind, URL and process.

The SQL and Redis stores are imported on first use, so that choosing a store loads only the
driver it needs. A forked child (RQ's work horse, Celery's prefork pool) opens its own store,
never using its parent's connections.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Literal

from workerkit.errors import ConfigurationError

if TYPE_CHECKING:
    from workerkit.idempotency.contract import IdempotencyStore
    from workerkit.settings import Settings

__all__ = ("default_store", "shared_store")

_stores: dict[tuple[int, str, str], IdempotencyStore] = {}
_stores_lock = threading.Lock()


def default_store(settings: Settings) -> IdempotencyStore:
    """The store used when none is given: by engine, one per URL and process.

    ``sql``: the SQL store on ``database_url`` (the native queue's database); ``rq`` and
    ``celery``: the Redis store on ``redis_url``. A forked child (RQ's work horse, Celery's
    prefork pool) gets its own, never its parent's connections.
    """
    if settings.engine == "sql":
        return shared_store("sql", settings.database_url)
    return shared_store("redis", settings.redis_url)


def shared_store(kind: Literal["sql", "redis"], url: str) -> IdempotencyStore:
    """This process's store of ``kind`` on ``url``, opened on first use."""
    cache_key = (os.getpid(), kind, url)
    with _stores_lock:
        store = _stores.get(cache_key)
        if store is None:
            store = _open_store(kind, url)
            _stores[cache_key] = store
        return store


def _open_store(kind: str, url: str) -> IdempotencyStore:
    if kind == "sql":
        from workerkit.idempotency.sql import SqlIdempotencyStore

        return SqlIdempotencyStore(url)
    try:
        from workerkit.idempotency.redis import RedisIdempotencyStore
    except ImportError as exc:
        raise ConfigurationError(
            f"idempotency keys on this engine are kept in Redis (redis_url), but the redis "
            f"package is not installed ({exc}); install workerkit[redis], or pass "
            f"idempotent(..., store=...)"
        ) from exc
    return RedisIdempotencyStore.from_url(url)


def _forget_parent_stores() -> None:
    # Entries of the parent are keyed by its pid and never used here; a lock held by another
    # thread at fork time would never be released in the child.
    global _stores_lock
    _stores_lock = threading.Lock()
    _stores.clear()


os.register_at_fork(after_in_child=_forget_parent_stores)
