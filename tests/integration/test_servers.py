"""The private servers the fixtures start: real round trips, and isolation between tests."""

from __future__ import annotations

import os
import pwd
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
import sqlalchemy as sa

from tests.support import servers

if TYPE_CHECKING:
    import redis

ISOLATION_KEY = "workerkit:test:isolation"


def _psycopg_conninfo(sqlalchemy_url: str) -> str:
    url = sa.make_url(sqlalchemy_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


@pytest.fixture
def engine(postgres_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(postgres_url)
    try:
        yield engine
    finally:
        engine.dispose()


# --------------------------------------------------------------------------------------------
# redis


def test_redis_set_get_incr_round_trip(redis_client: redis.Redis[bytes]) -> None:
    assert redis_client.set("greeting", "hello")
    assert redis_client.get("greeting") == b"hello"
    assert redis_client.incr("counter") == 1
    assert redis_client.incr("counter", 41) == 42


def test_redis_url_points_at_dedicated_db_of_private_server(
    redis_server: servers.RedisServer, redis_url: str, redis_client: redis.Redis[bytes]
) -> None:
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/1"
    info = redis_client.info("server")
    assert info["process_id"] == redis_server.pid
    assert redis_client.config_get("save") == {"save": ""}
    assert redis_client.config_get("appendonly") == {"appendonly": "no"}


def test_redis_restart_by_pid_keeps_port_and_append_only_data() -> None:
    import redis as redis_module

    first = servers.start_redis(appendonly=True)
    current = first
    try:
        client = redis_module.Redis.from_url(first.url())
        client.set("kept", "yes")
        client.close()
        current = servers.restart_redis(first, down_for=0.2)
        assert current.port == first.port
        assert current.pid != first.pid
        assert first.process.exited()
        client = redis_module.Redis.from_url(current.url())
        assert client.get("kept") == b"yes"
        client.close()
    finally:
        current.stop()


def test_redis_pubsub_round_trip(redis_client: redis.Redis[bytes]) -> None:
    pubsub = redis_client.pubsub()
    try:
        pubsub.subscribe("events")
        confirmation = pubsub.get_message(timeout=5)
        assert confirmation is not None
        assert confirmation["type"] == "subscribe"

        assert redis_client.publish("events", "job-finished") == 1

        message = pubsub.get_message(timeout=5)
        assert message is not None
        assert message["type"] == "message"
        assert message["data"] == b"job-finished"
    finally:
        pubsub.close()


def test_redis_blpop_wakes_when_another_client_pushes(
    redis_url: str, redis_client: redis.Redis[bytes]
) -> None:
    import redis

    popped: list[tuple[bytes, bytes] | None] = []
    blocker = redis.Redis.from_url(redis_url, client_name="blocker")

    def pop() -> None:
        popped.append(blocker.blpop(["jobs"], timeout=10))

    thread = threading.Thread(target=pop)
    thread.start()
    try:
        # Push only once the other client is really blocked in BLPOP, so this is a wake-up.
        deadline = time.monotonic() + 5
        while not any(
            c.get("name") == "blocker" and c.get("cmd") == "blpop"
            for c in redis_client.client_list()
        ):
            assert time.monotonic() < deadline, "the BLPOP client never blocked"
            time.sleep(0.005)
        redis_client.rpush("jobs", "job-1")
    finally:
        thread.join(timeout=15)
        blocker.close()
    assert not thread.is_alive()
    assert popped == [(b"jobs", b"job-1")]


@pytest.mark.parametrize("run", [1, 2])
def test_redis_db_is_flushed_between_tests(redis_client: redis.Redis[bytes], run: int) -> None:
    # Whichever of the two runs second would see the first one's key without the flush.
    assert redis_client.dbsize() == 0
    assert not redis_client.exists(ISOLATION_KEY)
    redis_client.set(ISOLATION_KEY, run)


# --------------------------------------------------------------------------------------------
# postgres


def test_postgres_create_insert_select_round_trip(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE jobs (id serial PRIMARY KEY, payload text NOT NULL)"))
        conn.execute(
            sa.text("INSERT INTO jobs (payload) VALUES (:payload)"),
            [{"payload": "a"}, {"payload": "b"}],
        )
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, payload FROM jobs ORDER BY id")).all()
    assert [tuple(row) for row in rows] == [(1, "a"), (2, "b")]


def test_postgres_skip_locked_hands_second_connection_the_next_row(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE jobs (id int PRIMARY KEY)"))
        conn.execute(sa.text("INSERT INTO jobs (id) VALUES (1), (2)"))
    claim = sa.text("SELECT id FROM jobs ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED")
    claim_all = sa.text("SELECT id FROM jobs ORDER BY id FOR UPDATE SKIP LOCKED")

    with engine.connect() as first, engine.connect() as second:
        first_tx = first.begin()
        assert first.execute(claim).scalar_one() == 1

        second_tx = second.begin()
        assert second.execute(claim).scalar_one() == 2
        # Both rows are now locked by someone else; a third claim finds nothing.
        with engine.connect() as third:
            assert third.execute(claim_all).all() == []

        first_tx.commit()
        # The lock on row 1 is gone; row 2 is still held by the second connection.
        with engine.connect() as third:
            assert third.execute(claim_all).scalars().all() == [1]
        second_tx.rollback()


def test_postgres_listen_notify_round_trip(postgres_url: str) -> None:
    conninfo = _psycopg_conninfo(postgres_url)
    with (
        psycopg.connect(conninfo, autocommit=True) as listener,
        psycopg.connect(conninfo, autocommit=True) as notifier,
    ):
        listener.execute("LISTEN workerkit_jobs")
        notifier.execute("SELECT pg_notify('workerkit_jobs', 'job-7')")
        received = list(listener.notifies(timeout=5, stop_after=1))
    assert [(n.channel, n.payload) for n in received] == [("workerkit_jobs", "job-7")]


@pytest.mark.parametrize("run", [1, 2])
def test_postgres_database_is_fresh_per_test(engine: sa.Engine, run: int) -> None:
    with engine.begin() as conn:
        assert not sa.inspect(conn).has_table("isolation")
        # The databases of earlier tests have been dropped: only ours is left.
        test_databases = conn.execute(
            sa.text("SELECT datname FROM pg_database WHERE datname LIKE 'test\\_%'")
        ).scalars()
        assert list(test_databases) == [engine.url.database]
        conn.execute(sa.text("CREATE TABLE isolation (run int)"))
        conn.execute(sa.text("INSERT INTO isolation VALUES (:run)"), {"run": run})


def test_postgres_database_is_copied_from_session_template(
    engine: sa.Engine, postgres_template: str
) -> None:
    with engine.connect() as conn:
        name = conn.execute(sa.text("SELECT current_database()")).scalar_one()
        marker = conn.execute(
            sa.text("SELECT obj_description('public'::regnamespace, 'pg_namespace')")
        ).scalar_one()
        template = conn.execute(
            sa.text("SELECT datistemplate, datallowconn FROM pg_database WHERE datname = :name"),
            {"name": postgres_template},
        ).one()
    assert name.startswith("test_")
    assert postgres_template == servers.TEMPLATE_DATABASE
    assert marker == servers.TEMPLATE_MARKER
    assert tuple(template) == (True, False)


def test_postgres_is_private_fast_and_not_run_as_root(
    postgres_server: servers.PostgresServer, engine: sa.Engine
) -> None:
    with engine.connect() as conn:
        settings = {
            name: conn.execute(sa.text(f"SHOW {name}")).scalar_one()
            for name in ("listen_addresses", "port", "fsync", "synchronous_commit")
        }
        backend_pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    assert settings == {
        "listen_addresses": "127.0.0.1",
        "port": str(postgres_server.port),
        "fsync": "off",
        "synchronous_commit": "off",
    }
    status = Path(f"/proc/{postgres_server.pid}/status")
    if status.exists():
        uid = int(
            next(
                line for line in status.read_text().splitlines() if line.startswith("Uid:")
            ).split()[1]
        )
        assert uid != 0
        if os.geteuid() == 0:
            assert uid == pwd.getpwnam(servers.POSTGRES_USER).pw_uid
    assert backend_pid != postgres_server.pid


# --------------------------------------------------------------------------------------------
# any database


def test_database_url_round_trip(database_url: str) -> None:
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE kv (k varchar(20) PRIMARY KEY, v int)"))
            conn.execute(sa.text("INSERT INTO kv VALUES ('answer', 42)"))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT v FROM kv WHERE k = 'answer'")).scalar_one() == 42
    finally:
        engine.dispose()


def test_integration_tests_are_marked_by_directory(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("integration") is not None
    assert request.node.get_closest_marker("unit") is None
