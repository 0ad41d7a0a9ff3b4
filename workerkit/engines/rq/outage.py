"""Riding out a Redis outage in the rq worker: backoff, the local bound of a lease, retried writes.

A start, a settle or a checkpoint that fails because Redis cannot be reached (a restart, a killed
connection) is tried again instead of abandoning the job: each retry of a settle is fenced by
the lease token (``leases.py``), so only a real loss of the lease ends it. The lease ends on
Redis's clock; the worker bounds it by its own monotonic clock read *before* the renewal that
set it (:func:`lease_bound`), never believing that a lease lasts longer than it does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from workerkit.engines.attempt import RETRY_FIRST, RETRY_MAX, backoff, lease_bound
from workerkit.engines.rq.startup import UNREACHABLE

__all__ = ("RETRY_FIRST", "RETRY_MAX", "Fenced", "RetryUnreachable", "backoff", "lease_bound")

log = logging.getLogger("workerkit.engines.rq")

_T = TypeVar("_T")


class Fenced(Exception):
    """A retried write found that the attempt no longer owns its job (its lease token)."""


@dataclass(eq=False)
class RetryUnreachable:
    """Runs one write until it lands, again after each connection error (Redis unreachable).

    ``until()`` is the monotonic time after which no more retries are made (None: no bound;
    the write's own fence, raising :class:`Fenced`, or the process being stopped ends it).
    ``lease_until()`` only tells the log lines apart: the first failure, and the first past the
    lease (the write still lands if nobody took the job), are logged as ``store_write_retry``;
    a write that lands after failures as ``store_write_recovered``. ``on_failure`` hears every
    failure (readiness).
    """

    what: str
    job_id: str
    lease_until: Callable[[], float]
    until: Callable[[], float] | None = None
    on_failure: Callable[[str], None] | None = None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    failures: int = field(default=0, init=False)

    def run(self, write: Callable[[], _T]) -> _T:
        """``write()``, again after each connection error while allowed; its result."""
        delays = backoff()
        warned_past_lease = False
        while True:
            try:
                result = write()
            except UNREACHABLE as exc:
                self.failures += 1
                if self.on_failure is not None:
                    self.on_failure(f"{self.what} failed: {type(exc).__name__}: {exc}")
                now = self.clock()
                if self.until is not None and now >= self.until():
                    raise
                past_lease = now >= self.lease_until()
                if self.failures == 1 or (past_lease and not warned_past_lease):
                    warned_past_lease = warned_past_lease or past_lease
                    self._log_retry(exc, past_lease, now)
                self.sleep(next(delays))
                continue
            if self.failures:
                log.info(
                    "%s written after Redis came back",
                    self.what,
                    extra={
                        "event": "store_write_recovered",
                        "what": self.what,
                        "job_id": self.job_id,
                        "failures": self.failures,
                    },
                )
            return result

    def _log_retry(self, exc: BaseException, past_lease: bool, now: float) -> None:
        if past_lease:
            message = (
                "%s still failing past the lease; retrying (fenced: it lands only if no other "
                "worker took the job)"
            )
        else:
            message = "%s failed, the lease still holds; retrying until Redis is back"
        log.warning(
            message,
            self.what,
            extra={
                "event": "store_write_retry",
                "what": self.what,
                "job_id": self.job_id,
                "error": f"{type(exc).__name__}: {exc}",
                "lease_left": round(self.lease_until() - now, 2),
            },
        )
