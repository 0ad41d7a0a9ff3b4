"""A test's own database on a shared redis-server: flushed before the test and after it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import redis

if TYPE_CHECKING:
    from tests.support.servers import RedisServer

__all__ = ("flushed_db",)


@contextlib.contextmanager
def flushed_db(server: RedisServer, db: int) -> Iterator[str]:
    """Database ``db`` of ``server`` emptied, its URL; emptied again afterwards.

    Servers are shared by a module or the session, so each test keeps to a database number of
    its own and leaves it empty for the next.
    """
    url = server.url(db)
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
        yield url
        client.flushdb()
    finally:
        client.close()
