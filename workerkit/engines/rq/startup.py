"""Waiting for Redis at start: not ready meanwhile, one log line per retry, a bounded budget.

A worker whose Redis is not up yet (the whole stack starting at once, a failover) waits and
retries as Celery's does instead of dying with a traceback; it exits with STORE_UNAVAILABLE once
``startup_timeout`` (the startup probe's budget) is spent. Nothing has been taken from a queue
while it waits, so a stop signal then ends the process at once: the handler raises
:class:`StartupInterrupted`, which also breaks out of a connect that hangs.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Final, TypeVar

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

from workerkit.errors import StoreUnavailable
from workerkit.events import StoreHealth, client

__all__ = (
    "CONNECT_TIMEOUT",
    "FIRST_DELAY",
    "MAX_DELAY",
    "UNREACHABLE",
    "StartupInterrupted",
    "install_startup_signals",
    "retry_delays",
    "wait_for_redis",
)

log = logging.getLogger("workerkit.engines.rq")

#: The first retry comes this soon; each next one twice as late, up to MAX_DELAY.
FIRST_DELAY: Final = 0.5
MAX_DELAY: Final = 5.0
#: The longest one connection attempt may take (an unroutable host never refuses).
CONNECT_TIMEOUT: Final = 5.0

#: What "Redis is not reachable" looks like (AuthenticationError and BusyLoadingError, Redis
#: still loading its data, are ConnectionErrors too).
UNREACHABLE: Final = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

T = TypeVar("T")


class StartupInterrupted(BaseException):
    """A stop signal arrived while the worker was still waiting for Redis.

    A BaseException, as KeyboardInterrupt: no ``except Exception`` on the way may swallow it.
    """


def retry_delays(first: float = FIRST_DELAY, cap: float = MAX_DELAY) -> Iterator[float]:
    """0.5, 1, 2, 4, 5, 5, ... seconds: exponential backoff, capped."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, cap)


def install_startup_signals(*, supervised: bool) -> None:
    """SIGTERM (and SIGINT when run on its own) raise :class:`StartupInterrupted` from now on.

    The worker's own handlers replace these once it is built. Under the supervisor, Ctrl-C in a
    terminal reaches the whole process group: the supervisor decides, so SIGINT is ignored.
    """

    def interrupted(signum: int, frame: FrameType | None) -> None:
        # Once: the process is on its way out, a second signal must not interrupt that.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise StartupInterrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, signal.SIG_IGN if supervised else interrupted)


def _describe(exc: BaseException) -> str:
    """One line saying why (redis-py's messages name the host and port, never a password)."""
    text = " ".join(str(exc).split()) or "no answer"
    return f"{type(exc).__name__}: {text}"


def _ping(url: str, timeout: float) -> None:
    probe = redis.Redis.from_url(
        url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        probe.ping()
    finally:
        probe.close()


def wait_for_redis(
    url: str,
    build: Callable[[], T],
    budget: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Ping Redis at ``url``, then return ``build()``; retry both while Redis is unreachable.

    Each retry logs one WARNING line (``store_connect_retry``: the reason, the next delay, the
    time waited) and reports the store as down to the supervisor, so readiness stays false.
    Raises :class:`~workerkit.errors.StoreUnavailable` when ``budget`` seconds have passed.
    """
    started = clock()
    delays = retry_delays()
    attempt = 0
    while True:
        attempt += 1
        left = budget - (clock() - started)
        try:
            _ping(url, max(0.1, min(CONNECT_TIMEOUT, left)))
            return build()
        except UNREACHABLE as exc:
            reason = _describe(exc)
        waited = clock() - started
        left = budget - waited
        client("worker").send(StoreHealth(ok=False, reason=f"redis unavailable: {reason}"))
        if left <= 0:
            log.error(
                "Redis still unreachable after %.0f s (startup_timeout); giving up",
                waited,
                extra={
                    "event": "store_unavailable",
                    "reason": reason,
                    "attempts": attempt,
                    "waited": round(waited, 1),
                    "startup_timeout": budget,
                },
            )
            raise StoreUnavailable(f"Redis unreachable for {waited:.0f} s at start: {reason}")
        delay = min(next(delays), left)
        log.warning(
            "cannot reach Redis (%s); retrying in %.1f s (%.0f of %.0f s startup_timeout used)",
            reason,
            delay,
            waited,
            budget,
            extra={
                "event": "store_connect_retry",
                "reason": reason,
                "attempt": attempt,
                "retry_in": round(delay, 2),
                "waited": round(waited, 1),
                "startup_timeout": budget,
            },
        )
        sleep(delay)
