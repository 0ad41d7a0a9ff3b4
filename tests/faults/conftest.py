"""The fault suite's servers: one redis-server (append-only, so its data survives a restart)
and one PostgreSQL cluster per test module, of the module's own, restarted by the scenarios.

Each fixture yields a one-item list: a restart gives back a new server object, which the
scenario puts in place of the old one (``holder[0] = restart_redis(holder[0])``) so that the
one running at the end is the one stopped.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import servers
from tests.support.suite import start_or_skip


@pytest.fixture(scope="module")
def fault_redis() -> Iterator[list[servers.RedisServer]]:
    holder = [start_or_skip(lambda: servers.start_redis(appendonly=True))]
    try:
        yield holder
    finally:
        holder[0].stop()


@pytest.fixture(scope="module")
def fault_postgres() -> Iterator[list[servers.PostgresServer]]:
    holder = [start_or_skip(servers.start_postgres)]
    try:
        yield holder
    finally:
        holder[0].stop()
