"""The sql worker's start: reach the database first, say why not, retry or exit.

Before it claims anything the worker connects and checks the schema: a database that cannot heal
by waiting ends it with STORE_UNAVAILABLE (3), one that may come back is retried up to
``startup_timeout``. The cases and what the operator sees: docs/engines/sql.md ("Starting").
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

import sqlalchemy as sa

from workerkit import events as events_module
from workerkit import exitcodes
from workerkit.app import App
from workerkit.engines.lifeline import Lifeline, stop_children
from workerkit.engines.sql import db
from workerkit.errors import ConfigurationError
from workerkit.events import EventClient, StoreHealth
from workerkit.proctree import STOP_GRACE

if TYPE_CHECKING:
    from workerkit.engines.base import StoreHealth as Health
    from workerkit.settings import Settings

__all__ = (
    "FIRST_DELAY",
    "MAX_DELAY",
    "StoreUnreachable",
    "is_permanent",
    "main",
    "reach_store",
    "retry_delays",
    "wait_for_store",
)

log = logging.getLogger("workerkit.engines.sql.worker")

#: The first retry comes this soon; each next one twice as late, up to MAX_DELAY (as rq's).
FIRST_DELAY: Final = 0.5
MAX_DELAY: Final = 5.0

# SQLite's primary result codes that no wait can fix: CANTOPEN (missing or unwritable
# directory), READONLY, PERM, CORRUPT, NOTADB, AUTH.
_SQLITE_PERMANENT: Final = frozenset({14, 8, 3, 11, 26, 23})
# What PostgreSQL's server says (FATAL at connect; psycopg gives no SQLSTATE there) when the
# credentials or the database name are wrong.
_PG_PERMANENT: Final = (
    "password authentication failed",
    "authentication failed",
    "no pg_hba.conf entry",
    "does not exist",  # role "x" / database "x"
    "permission denied for database",
    "no password supplied",
)


class StoreUnreachable(Exception):
    """The database cannot be used, now or (``permanent``) ever without a change of settings."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


class _StartupInterrupted(BaseException):
    """A stop signal while waiting for the database.

    A BaseException, as KeyboardInterrupt: raised from the signal handler, it must break out of
    a connect that hangs, and no ``except Exception`` on the way may swallow it.
    """


def retry_delays(first: float = FIRST_DELAY, cap: float = MAX_DELAY) -> Iterator[float]:
    """0.5, 1, 2, 4, 5, 5, ... seconds."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, cap)


def is_permanent(exc: BaseException) -> bool:
    """Whether a connect error cannot heal by waiting (wrong path, rights or credentials)."""
    orig: BaseException = exc
    while not isinstance(orig, sa.exc.DBAPIError) and orig.__cause__ is not None:
        orig = orig.__cause__
    if isinstance(orig, sa.exc.DBAPIError) and orig.orig is not None:
        orig = orig.orig
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in _SQLITE_PERMANENT
    if isinstance(orig, PermissionError):
        return True
    text = str(orig)
    return "FATAL" in text and any(marker in text for marker in _PG_PERMANENT)


def _probe(url: sa.URL, engine: sa.Engine) -> Health:
    """Connect and read the schema's revision; StoreUnreachable when the database cannot.

    On SQLite inside ``BEGIN IMMEDIATE``, the write lock: a file the worker may read but not
    write (SQLITE_READONLY) is found here, not at the first claim.
    """
    try:
        with engine.connect() as connection:
            if url.get_backend_name() != "sqlite":
                connection.execution_options(**{db.READ_ONLY_OPTION: True})
            with connection.begin():
                return db.schema_status(connection)
    except (sa.exc.DBAPIError, sa.exc.TimeoutError, OSError) as exc:
        reason = f"database unreachable: {db.describe_error(exc, url)}"
        raise StoreUnreachable(reason, permanent=is_permanent(exc)) from exc


def wait_for_store(
    url: sa.URL,
    engine: sa.Engine,
    budget: float,
    events: EventClient,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Return once the database answers; raise :class:`StoreUnreachable` when it will not.

    Permanent errors are raised at once; others are retried (``store_connect_retry``, one
    WARNING line each, the store reported down to the supervisor) until ``budget`` seconds
    have passed. A schema that is not at head is logged and left to the worker, which waits
    for ``workerkit db upgrade`` unready, as before.
    """
    started = clock()
    delays = retry_delays()
    attempt = 0
    while True:
        attempt += 1
        try:
            health = _probe(url, engine)
        except StoreUnreachable as exc:
            waited = clock() - started
            events.send(StoreHealth(ok=False, reason=exc.reason))
            if exc.permanent or waited >= budget:
                raise
            delay = min(next(delays), budget - waited)
            log.warning(
                "%s; retrying in %.1f s (%.0f of %.0f s startup_timeout used)",
                exc.reason,
                delay,
                waited,
                budget,
                extra={
                    "event": "store_connect_retry",
                    "reason": exc.reason,
                    "attempt": attempt,
                    "retry_in": round(delay, 2),
                    "waited": round(waited, 1),
                    "startup_timeout": budget,
                },
            )
            sleep(delay)
            continue
        if not health.ok:
            log.warning(
                "store is not ready: %s",
                health.reason,
                extra={"event": "store_health", "ok": False, "reason": health.reason},
            )
        return


def _install_startup_signals() -> None:
    def interrupted(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _StartupInterrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides (see the worker)


def _config_error(message: str) -> None:
    log.error(message, extra={"event": "worker_config_error"})
    sys.exit(exitcodes.CONFIG_ERROR)


def _remember_sigterm() -> threading.Event:
    """From now on a SIGTERM only sets the returned event (the worker is not built yet)."""
    stop = threading.Event()

    def remembered(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, remembered)
    return stop


def reach_store(app: App, budget: float, events: EventClient) -> threading.Event:
    """:func:`wait_for_store` for the app's queue; exit 3 (or 0 on a stop signal) when not.

    Returns an event that a SIGTERM arriving afterwards sets: the handler that ends a wait
    raises, and must not be left in place while the worker is being built.
    """
    backend = app.backend
    url, engine = getattr(backend, "url", None), getattr(backend, "engine", None)
    if not isinstance(url, sa.URL) or not isinstance(engine, sa.Engine):
        return _remember_sigterm()  # not a SQL queue (an in-memory one): nothing to reach
    _install_startup_signals()
    try:
        wait_for_store(url, engine, budget, events)
        return _remember_sigterm()  # inside the try: a signal just before it still exits 0
    except StoreUnreachable as exc:
        what = "cannot be fixed by waiting" if exc.permanent else "startup_timeout spent"
        log.error(
            "%s (%s); exiting",
            exc.reason,
            what,
            extra={"event": "store_unavailable", "reason": exc.reason, "permanent": exc.permanent},
        )
        logging.shutdown()
        os._exit(exitcodes.STORE_UNAVAILABLE)
    except _StartupInterrupted as stop:
        log.info(
            "stopped while waiting for the database",
            extra={"event": "worker_stopped_starting", "signal": str(stop)},
        )
        logging.shutdown()
        os._exit(exitcodes.OK)


def _install_presence(events: EventClient, settings: Settings) -> Any:
    """The worker's presence publisher (the dashboard's workers page), writing to the SQL store."""
    from workerkit.engines.presence_publisher import install_presence
    from workerkit.engines.sql.presence_store import presence_store

    return install_presence(events, lambda: presence_store(settings))


def _import_ahead() -> None:
    """Import, before the start gate, what the worker imports on its way to ready after it."""
    import workerkit.engines.presence_publisher
    import workerkit.engines.sql.presence_store  # noqa: F401


def main() -> None:
    """``python -m workerkit.engines.sql``: the sql engine's worker, started by the supervisor."""
    from workerkit.drill.canary import register_sql
    from workerkit.engines.sql.worker import NativeWorker
    from workerkit.engines.startgate import wait_for_start
    from workerkit.loading import import_app
    from workerkit.logs import configure_logging
    from workerkit.settings import load_settings

    _import_ahead()
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    # Started early by `workerkit run`: the imports above ran beside the supervisor's; answer
    # its app check, then the database only once the supervisor says go.
    wait_for_start("sql", (), settings)
    if not settings.app:
        _config_error("the sql worker needs an app: give --app MODULE:APP or WORKERKIT_APP")
        return
    app = import_app(settings.app)
    if not isinstance(app, App):
        _config_error(f"--app {settings.app} is not a workerkit.App")
    register_sql(app)  # the drill's canary, in every sql worker (docs/reference/drill.md)
    events = events_module.client("worker")
    stop_early = threading.Event()
    try:
        app.configure_settings(settings)
        stop_early = reach_store(app, settings.startup_timeout, events)
    except ConfigurationError as exc:
        _config_error(str(exc))
    # At a release, the jobs' subprocesses are stopped before the jobs are released: with a
    # grace that leaves most of the 0.3 M between the release command and the kill to the
    # release writes (0.5 s at the default M = 5 s).
    grace = min(STOP_GRACE, max(0.1, settings.release_margin * 0.1))
    worker = NativeWorker(app, settings, events=events, stop_children=lambda: stop_children(grace))
    # A SIGTERM from now on reaches the worker (run() installs its own handler, to the same
    # effect); one that came while it was being built is passed on.
    signal.signal(signal.SIGTERM, lambda signum, frame: worker.stop_fetching())
    if stop_early.is_set():
        worker.stop_fetching()
    # The supervisor's death (or SIGQUIT) is the supervisor's release command, at once.
    Lifeline(worker.request_release).start()
    presence = _install_presence(events, settings.replace(database_url=app.database_url))
    code = worker.run()
    if presence is not None:
        presence.close()  # a clean exit: the record goes
    # Jobs run in threads of this process, so a subprocess cannot be told apart by the job
    # that started it: every one still running is stopped now, as the worker ends (after a
    # drain: a finished job's; after a release they were stopped before it).
    stop_children(STOP_GRACE)
    logging.shutdown()
    # Job threads of released or timed-out jobs may still be blocked in C code; their work is
    # settled and fenced, so do not wait for them.
    os._exit(code)
