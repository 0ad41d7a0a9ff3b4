"""A test's own database on a shared redis-server: flushed before the test and after it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import redis

if TYPE_CHECKING:
    from tests.support.servers import RedisServer

__all__ = ("flushed_db",)

#: Commands a worker blocks in while it waits for a job (kombu, RQ, workerkit's reliable pop).
BLOCKING: frozenset[str] = frozenset(
    {"blpop", "brpop", "blmove", "brpoplpush", "bzpopmin", "bzpopmax", "blmpop", "bzmpop"}
)


@contextlib.contextmanager
def flushed_db(server: RedisServer, db: int) -> Iterator[str]:
    """Database ``db`` of ``server`` emptied, its URL; emptied again afterwards.

    Servers are shared by a module or the session, so each test keeps to a database number of
    its own and leaves it empty for the next. Before each flush, the clients still blocked on
    this database are disconnected: a worker of the previous test, killed while its blocking pop
    waited, may still have its connection open in Redis for a moment (a forked child's copy of
    the socket), and Redis would serve that pop with the next test's first job, into a list the
    flush had just unregistered (seen once: test_celery_pop after test_celery_poison).
    """
    url = server.url(db)
    client = redis.Redis.from_url(url)
    try:
        _disconnect_blocked(client, db)
        client.flushdb()
        yield url
        _disconnect_blocked(client, db)
        client.flushdb()
    finally:
        client.close()


def _disconnect_blocked(client: redis.Redis[Any], db: int) -> None:
    for info in client.client_list():
        if int(info.get("db", -1)) == db and str(info.get("cmd", "")) in BLOCKING:
            with contextlib.suppress(redis.exceptions.ResponseError):  # gone meanwhile
                client.client_kill_filter(_id=info["id"])
