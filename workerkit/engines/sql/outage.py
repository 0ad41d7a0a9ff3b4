"""Riding out a store outage in the sql worker: backoff, the local view of a lease, retried writes.

Settles, checkpoints and lease renewals are retried while the database is away, until the fence
says the job is someone else's (:class:`~workerkit.errors.LeaseLost`); :func:`lease_bound` never
believes a lease lasts longer than it does. Why: docs/engines/sql.md ("When the database goes
away").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypeGuard

from workerkit.engines.attempt import RETRY_FIRST, RETRY_MAX, RetriedWrite, backoff, lease_bound
from workerkit.errors import StoreUnavailable
from workerkit.job import CheckpointSink, TransactionalCheckpointSink

__all__ = (
    "LANDING_MARGIN",
    "RECOVERY_GRACE",
    "RETRY_FIRST",
    "RETRY_MAX",
    "ClaimPause",
    "RetryingSink",
    "RetryingWrite",
    "backoff",
    "lease_bound",
    "recovery_grace",
    "retrying_sink",
)

log = logging.getLogger(__name__)

#: The least the worker waits after a store outage before it claims again (seconds).
RECOVERY_GRACE: Final = 3.0
#: For the statement itself, once connected, and the thread's scheduling (seconds).
LANDING_MARGIN: Final = 1.0


def recovery_grace(connect_timeout: float) -> float:
    """How long after the store's return a write being retried surely has landed.

    A retry in progress when the store comes back is either asleep (RETRY_MAX at most) or
    inside a connect that the outage made hang (``connect_timeout`` at most, the host being
    unreachable rather than refusing: a partition), followed by one more backoff; then it
    lands. So ``connect_timeout + RETRY_MAX + LANDING_MARGIN``, and RECOVERY_GRACE at least.
    """
    return max(RECOVERY_GRACE, connect_timeout + RETRY_MAX + LANDING_MARGIN)


@dataclass(eq=False, kw_only=True)
class RetryingWrite(RetriedWrite):
    """Runs one write until it lands, retrying while the store is unavailable
    (:class:`~workerkit.engines.attempt.RetriedWrite`, on :class:`StoreUnavailable`).

    ``once``: one attempt, no retry (the main thread's settles: it must not block on the
    store). ``stop`` set ends the retries at once (the worker is releasing); the waits between
    tries are waits on it.
    """

    stop: threading.Event
    once: bool = False

    errors: ClassVar[tuple[type[BaseException], ...]] = (StoreUnavailable,)
    store: ClassVar[str] = "the store"
    log: ClassVar[logging.Logger] = log

    def _give_up(self) -> bool:
        return self.once or self.stop.is_set()

    def _pause(self, seconds: float) -> None:
        self.stop.wait(seconds)


class RetryingSink:
    """A checkpoint sink whose write is retried (:class:`RetryingWrite`) while the store is down.

    ``retry()`` builds the policy for one save: the worker bounds a checkpoint's retries by the
    lease, after which the job hears the store's error as before.
    """

    def __init__(self, inner: CheckpointSink, retry: Callable[[], RetryingWrite]) -> None:
        self._inner = inner
        self._retry = retry
        self.backend = getattr(inner, "backend", None)  # named in JobContext's error messages

    def __call__(self, state: Any) -> None:
        self._retry().run(lambda: self._inner(state))


class _RetryingTransactionalSink(RetryingSink):
    """:class:`RetryingSink` of a queue that can also write inside the job's transaction.

    The write inside the caller's transaction is not retried: it is the caller's, and a failed
    statement has already doomed that transaction.
    """

    def __init__(
        self, inner: TransactionalCheckpointSink, retry: Callable[[], RetryingWrite]
    ) -> None:
        super().__init__(inner, retry)
        self._transactional = inner

    def save_in(self, connection: Any, state: Any) -> None:
        self._transactional.save_in(connection, state)

    def transaction(self) -> AbstractContextManager[Any]:
        return self._transactional.transaction()


def retrying_sink(inner: CheckpointSink, retry: Callable[[], RetryingWrite]) -> CheckpointSink:
    """``inner`` with its plain writes retried; still transactional when ``inner`` is."""
    if _transactional_sink(inner):
        return _RetryingTransactionalSink(inner, retry)
    return RetryingSink(inner, retry)


_transactional: dict[type, bool] = {}


def _transactional_sink(sink: CheckpointSink) -> TypeGuard[TransactionalCheckpointSink]:
    """``isinstance(sink, TransactionalCheckpointSink)`` once per class (a protocol's check
    looks up each of its methods: ~0.05 ms per job)."""
    kind = type(sink)
    known = _transactional.get(kind)
    if known is None:
        known = _transactional[kind] = isinstance(sink, TransactionalCheckpointSink)
    return known


class ClaimPause:
    """The claimer's side of an outage: no claim until the writes of other workers landed.

    Other workers cannot know that someone's settle is pending; what they know is that the
    store was away. After an outage of at least ``threshold`` seconds (long enough for someone's
    lease to have run out while its result waited to be written), :meth:`allows` says no for
    ``grace`` seconds (:func:`recovery_grace`). It is asked again inside the claim, once the
    claim holds its connection or the write lock, just before its write: a claim that started
    before the pause, or that itself waited ``threshold`` for the store, claims nothing.
    """

    def __init__(
        self, grace: float, threshold: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.grace = grace
        self.threshold = threshold
        self._clock = clock
        self._until = -float("inf")

    def store_back(self, down_since: float) -> None:
        """The store answers again; it may have been away since ``down_since`` (monotonic)."""
        now = self._clock()
        if now - down_since >= self.threshold:
            self._until = max(self._until, now + self.grace)

    def left(self) -> float:
        """Seconds until claims may start again (0 when they may now)."""
        return max(0.0, self._until - self._clock())

    def allows(self, claim_sent: float) -> bool:
        """Inside a claim sent at ``claim_sent``, just before its write: may it claim?"""
        self.store_back(claim_sent)  # a claim that waited that long waited out an outage
        return self.left() == 0.0
