"""Riding out a broker outage in a Celery worker: retried checkpoints, acks and requeues.

A write of workerkit's own (a checkpoint, the fenced ack, the fenced requeue) that fails because
Redis cannot be reached is tried again with backoff instead of failing the task or dropping its
message: the lease, not the error, says whether the task is still ours. A settle that cannot land
at once keeps the message in hand (its lease renewed by the keeper) and is retried in a thread
until it lands or the fence says another worker holds the message.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Final, TypeVar

from workerkit.engines.attempt import RETRY_FIRST, backoff

__all__ = (
    "RETRY_FIRST",
    "RETRY_MAX",
    "backoff",
    "broker_errors",
    "retry_in_background",
    "retrying",
)

log = logging.getLogger("workerkit.engines.celery")

_T = TypeVar("_T")

#: The longest wait between two tries (seconds): a settle lands within half a second of the
#: broker's return (the shared backoff's cap is 1 s).
RETRY_MAX: Final = 0.5


@functools.cache
def broker_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean "Redis cannot be reached now" (a restart, a killed connection,
    a server still loading its data): redis-py's ConnectionError (BusyLoadingError is one)
    and TimeoutError. Imported here: the package is imported by the supervisor too."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return (RedisConnectionError, RedisTimeoutError)


def retrying(
    what: str,
    job_id: str,
    write: Callable[[], _T],
    *,
    keep_trying: Callable[[], bool],
    sleep: Callable[[float], object] = time.sleep,
    quiet: bool = False,
) -> _T:
    """``write()``, again after each broker error while ``keep_trying()``; its result.

    The last broker error is raised once ``keep_trying()`` is false; any other error at once.
    The first failure is logged (``broker_write_retry``), and a write that landed after failures
    (``broker_write_recovered``); neither with ``quiet`` (the caller reports its own failures).
    """
    delays = backoff(cap=RETRY_MAX)
    failures = 0
    while True:
        try:
            result = write()
        except broker_errors() as exc:
            failures += 1
            if failures == 1 and not quiet:
                log.warning(
                    "%s failed: the broker is unreachable; retrying",
                    what,
                    extra={
                        "event": "broker_write_retry",
                        "what": what,
                        "job_id": job_id,
                        "error": str(exc),
                    },
                )
            if not keep_trying():
                raise
            sleep(next(delays))
            continue
        if failures and not quiet:
            log.info(
                "%s written after the broker came back",
                what,
                extra={
                    "event": "broker_write_recovered",
                    "what": what,
                    "job_id": job_id,
                    "failures": failures,
                },
            )
        return result


def retry_in_background(
    what: str,
    job_id: str,
    write: Callable[[], _T],
    *,
    done: Callable[[_T], None],
    failed: Callable[[Exception], None],
) -> threading.Thread:
    """Retry ``write()`` in a daemon thread until it lands (broker errors only); then ``done``
    hears its result, or ``failed`` any other error."""

    def run() -> None:
        try:
            result = retrying(what, job_id, write, keep_trying=lambda: True)
        except Exception as exc:
            failed(exc)
            return
        done(result)

    thread = threading.Thread(target=run, name=f"workerkit-settle-{job_id}", daemon=True)
    thread.start()
    return thread
