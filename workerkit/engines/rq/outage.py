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
from dataclasses import dataclass
from typing import ClassVar

from workerkit.engines.attempt import RETRY_FIRST, RETRY_MAX, RetriedWrite, backoff, lease_bound
from workerkit.engines.rq.startup import UNREACHABLE

__all__ = ("RETRY_FIRST", "RETRY_MAX", "Fenced", "RetryUnreachable", "backoff", "lease_bound")

log = logging.getLogger("workerkit.engines.rq")


class Fenced(Exception):
    """A retried write found that the attempt no longer owns its job (its lease token)."""


@dataclass(eq=False)
class RetryUnreachable(RetriedWrite):
    """Runs one write until it lands, again after each connection error (Redis unreachable):
    :class:`~workerkit.engines.attempt.RetriedWrite` on ``ConnectionError`` and
    ``TimeoutError``.

    No bound but ``until()``: the write's own fence (raising :class:`Fenced`), or the process
    being stopped, ends it otherwise.
    """

    sleep: Callable[[float], None] = time.sleep

    errors: ClassVar[tuple[type[BaseException], ...]] = UNREACHABLE
    store: ClassVar[str] = "Redis"
    log: ClassVar[logging.Logger] = log

    def _describe(self, exc: BaseException) -> str:
        return f"{type(exc).__name__}: {exc}"

    def _pause(self, seconds: float) -> None:
        self.sleep(seconds)
