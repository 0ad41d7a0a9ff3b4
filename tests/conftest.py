"""Shared fixtures: private redis-server and PostgreSQL, per-test databases, markers.

Servers start lazily (a unit-only run starts none), once per session, and are stopped by their
own pid at the end of the session. See ``tests/support/servers.py`` for how; the shared parts
of the hooks below are in ``tests/support/suite.py``.

Fixtures
--------
``redis_server`` (session)      :class:`servers.RedisServer` - ``.host``, ``.port``, ``.url(db)``
``redis_url`` (function)        ``redis://127.0.0.1:PORT/1``; db 1 is FLUSHDB'd before and after
``redis_client`` (function)     a ``redis.Redis`` on ``redis_url``, closed afterwards
``postgres_server`` (session)   :class:`servers.PostgresServer` - ``.url(db)``, ``.conninfo(db)``
``postgres_template_setup``     (session) list of callables run once on the template database
``postgres_template`` (session) name of the template database (``workerkit_template``)
``postgres_url`` (function)     ``postgresql+psycopg://postgres@127.0.0.1:PORT/test_<hex>``, a
                                fresh database copied from the template, dropped afterwards
``sqlite_url`` (function)       ``sqlite:////<tmp_path>/workerkit.sqlite3``
``database_url`` (function)     parametrized: ``sqlite_url`` then ``postgres_url``
``blank_postgres_url``, ``blank_database_url`` (function)  the same without the workerkit schema

A server that is missing or does not start skips the test locally and fails it when the ``CI``
environment variable is set (``./scripts/test.sh`` installs both servers when run as root).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support import servers
from tests.support.suite import LAYERS, layer_durations, layer_of, start_or_skip

if TYPE_CHECKING:
    import redis

REDIS_TEST_DB = 1


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by directory: tests/unit -> unit, tests/integration -> integration,
    tests/e2e -> e2e; a test that already carries one of these markers keeps its own."""
    del config
    for item in items:
        layer = layer_of(item.path)
        if layer is None or any(item.get_closest_marker(name) for name in LAYERS):
            continue
        item.add_marker(getattr(pytest.mark, layer))


@pytest.hookimpl(trylast=True)  # after --durations: the last word of the run
def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    """Where the time went: tests and seconds per layer (unit, integration, e2e)."""
    del exitstatus
    reports = [r for stat in terminalreporter.stats.values() for r in stat]
    durations = layer_durations(reports, config.rootpath)
    if not durations:
        return
    terminalreporter.section("time per layer")
    for layer, (count, call, total) in durations.items():
        terminalreporter.write_line(
            f"{layer:<12} {count:>5} tests  {total:8.1f} s"
            f"  (calls {call:.1f} s, setup and teardown {total - call:.1f} s)"
        )


# --------------------------------------------------------------------------------------------
# redis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[servers.RedisServer]:
    server = start_or_skip(servers.start_redis)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: servers.RedisServer) -> Iterator[str]:
    from tests.support.redis_db import flushed_db

    with flushed_db(redis_server, REDIS_TEST_DB) as url:
        yield url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis[bytes]]:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


# --------------------------------------------------------------------------------------------
# postgres


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[servers.PostgresServer]:
    server = start_or_skip(servers.start_postgres)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_template_setup() -> list[Callable[[str], None]]:
    """Steps run once per session on the template database, each given its SQLAlchemy URL.

    This is where the store's schema goes once it exists: append a callable that migrates the
    database at the URL (e.g. runs the alembic upgrade), and every ``postgres_url`` database
    starts with that schema at the cost of one copy. Edit it here, in the top-level conftest: a
    session fixture resolves it once, so an override in a sub-directory would apply to whichever
    test happened to start PostgreSQL first.
    """
    from workerkit.engines.sql import upgrade

    def migrate(url: str) -> None:
        upgrade(url)

    return [migrate]


@pytest.fixture(scope="session")
def postgres_template(
    postgres_server: servers.PostgresServer,
    postgres_template_setup: list[Callable[[str], None]],
) -> str:
    return servers.create_template(postgres_server, postgres_template_setup)


@pytest.fixture
def postgres_url(postgres_server: servers.PostgresServer, postgres_template: str) -> Iterator[str]:
    name = f"test_{uuid.uuid4().hex[:12]}"
    servers.create_database(postgres_server, name, postgres_template)
    try:
        yield postgres_server.url(name)
    finally:
        servers.drop_database(postgres_server, name)


@pytest.fixture
def blank_postgres_url(postgres_server: servers.PostgresServer) -> Iterator[str]:
    """A database with no workerkit schema (copied from template0), for migration tests."""
    name = f"blank_{uuid.uuid4().hex[:12]}"
    servers.create_database(postgres_server, name, "template0")
    try:
        yield postgres_server.url(name)
    finally:
        servers.drop_database(postgres_server, name)


# --------------------------------------------------------------------------------------------
# any database


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'workerkit.sqlite3'}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """SQLite (a new file; tests migrate it when they need to), then PostgreSQL (a migrated
    copy of the template)."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def blank_database_url(request: pytest.FixtureRequest) -> str:
    """A database without the workerkit schema: SQLite, then PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "blank_postgres_url"
    url: str = request.getfixturevalue(name)
    return url
