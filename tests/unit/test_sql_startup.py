"""The sql worker's start: which database errors cannot heal by waiting; the first report logged.

The real failures (a read-only directory, a refused port, wrong credentials) are in
tests/e2e/test_sql_startup.py.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.native_worker import Harness, wait_until
from workerkit.app import App
from workerkit.engines.sql import SqlQueue, head_revision, upgrade
from workerkit.engines.sql.db import SCHEMA_HEAD
from workerkit.engines.sql.startup import is_permanent, reach_store
from workerkit.errors import StoreUnavailable
from workerkit.events import EventClient, StoreHealth
from workerkit.settings import Settings

DOWN = StoreUnavailable("postgresql database unavailable: OperationalError: connection refused")


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    if h.worker is not None and h.thread is not None and h.thread.is_alive():
        h.worker.request_release()
        h.thread.join(5)


def test_a_store_that_fails_from_the_start_is_logged(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    def down() -> Any:
        raise DOWN

    harness.queue.health = down  # type: ignore[method-assign]
    caplog.set_level(logging.WARNING, logger="workerkit.engines.sql.worker")
    harness.start()
    wait_until(lambda: bool(harness.events.of_type(StoreHealth)), timeout=5)
    wait_until(lambda: any(getattr(r, "event", "") == "store_health" for r in caplog.records))
    record = next(r for r in caplog.records if getattr(r, "event", "") == "store_health")
    assert record.levelno == logging.WARNING
    assert "StoreUnavailable" in record.reason  # type: ignore[attr-defined]


def sqlite_error(code: int) -> sqlite3.OperationalError:
    error = sqlite3.OperationalError("sqlite says no")
    error.sqlite_errorcode = code
    return error


@pytest.mark.parametrize(
    ("error", "permanent"),
    [
        (sqlite_error(14), True),  # SQLITE_CANTOPEN: a missing or read-only directory
        (sqlite_error(8), True),  # SQLITE_READONLY
        (sqlite_error(5), False),  # SQLITE_BUSY: someone holds the lock
        (sqlite_error(13), False),  # SQLITE_FULL: space may come back
        (PermissionError(13, "Permission denied"), True),
        (Exception('connection failed: FATAL:  role "x" does not exist'), True),
        (Exception('connection failed: FATAL:  database "x" does not exist'), True),
        (Exception("connection failed: FATAL:  password authentication failed"), True),
        (Exception("connection failed: Connection refused"), False),
        (Exception("connection failed: FATAL:  the database system is starting up"), False),
        (Exception("failed to resolve host 'db': Name or service not known"), False),
    ],
)
def test_which_startup_errors_cannot_heal_by_waiting(error: Exception, permanent: bool) -> None:
    assert is_permanent(error) is permanent


def test_a_sigterm_after_the_database_answered_is_kept_for_the_worker(tmp_path: Path) -> None:
    """The handler that ends the wait for the database raises; it must not outlive the wait,
    or a SIGTERM while the worker is being built escapes main() with a traceback (exit 1)."""
    url = f"sqlite:///{tmp_path / 'queue.sqlite3'}"
    upgrade(url)
    settings = Settings(database_url=url)
    queue = SqlQueue(url, settings=settings)
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        stop = reach_store(App(backend=queue, settings=settings), 5.0, EventClient(None, role=""))
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)  # handled in this (the main) thread: no raise
        wait_until(stop.is_set, timeout=5)
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
        queue.close()


def test_the_schema_head_written_in_the_code_is_alembics() -> None:
    """SCHEMA_HEAD lets a worker check its schema without Alembic: a new migration moves it."""
    assert head_revision() == SCHEMA_HEAD


def test_a_sqlite_worker_imports_no_postgresql_dialect() -> None:
    """SQLAlchemy's PostgreSQL dialect costs a SQLite worker ~30 ms of its start: a module-level
    ``from sqlalchemy.dialects import postgresql`` (or a ``postgresql_where`` on an Index at
    import) on the worker's path brings it back."""
    script = textwrap.dedent(
        """
        import sys
        import workerkit.engines.sql.startup as startup
        from workerkit.engines.sql import dashboard, scheduling, statements
        from workerkit.engines.sql.worker import NativeWorker
        startup._import_ahead()
        statements.insert_job_statement("sqlite")
        print(sorted(name for name in sys.modules if name.startswith("sqlalchemy.dialects.post")))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


def test_a_schema_at_head_is_checked_without_importing_alembic(tmp_path: Path) -> None:
    """Alembic costs a worker ~0.1 s of its start; a database at head needs one SELECT."""
    url = f"sqlite:///{tmp_path / 'queue.sqlite3'}"
    upgrade(url)
    script = textwrap.dedent(
        f"""
        import sys
        from workerkit.engines.sql import db
        engine = db.create_engine_for({url!r})
        with engine.connect() as connection, connection.begin():
            health = db.schema_status(connection)
        assert health.ok, health
        print(sorted(name for name in sys.modules if name.split(".")[0] == "alembic"))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
