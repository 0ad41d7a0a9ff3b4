"""The sql worker's leases: renewed every H while its jobs run, and the retried writes' policy.

:class:`LeaseKeeping` is a part of :class:`~workerkit.engines.sql.worker.NativeWorker`: the lease
keeper thread renews every running job's lease (and the held jobs', :mod:`.prefetch`) until a
release; a write retried through a store outage keeps readiness false until it lands, and a
checkpoint is retried only while the job's lease surely holds (:mod:`.outage`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from workerkit.engines.sql.outage import RetryingWrite, backoff, lease_bound
from workerkit.events import JobHeartbeat

if TYPE_CHECKING:
    from collections import deque

    from workerkit.engines.base import QueueBackend
    from workerkit.engines.sql.prefetch import Prefetched
    from workerkit.engines.sql.running import Running
    from workerkit.events import BatchingSender, EventClient
    from workerkit.settings import Settings

__all__ = ("LeaseKeeping",)

log = logging.getLogger("workerkit.engines.sql.worker")


class LeaseKeeping:
    """The lease keeper's duty, every H until a release (a mixin of ``NativeWorker``)."""

    backend: QueueBackend
    settings: Settings
    _job_events: BatchingSender | EventClient
    _running: dict[str, Running]
    _running_lock: threading.Lock
    _held: deque[Prefetched]
    _lease_ttl: float
    _lease_delays: Iterator[float]
    _release_requested: threading.Event
    _retrying: int
    _write_trouble: str

    # Implemented by the worker or another of its parts; declared for the type checker only, as
    # a method here would shadow the implementation of a part after this one in the bases.
    if TYPE_CHECKING:

        def _renew_prefetched(self) -> str:
            raise NotImplementedError

        def _store_failed(self, reason: str) -> None:
            raise NotImplementedError

    def _extend_leases(self) -> float | None:
        """Renew every running job's lease; after a failure, try again soon (with backoff)."""
        with self._running_lock:
            running = [r for r in self._running.values() if not r.acked_by_claim]
        failed = self._renew_prefetched() if self._held else ""
        for item in running:
            sent = time.monotonic()
            try:
                kept = self.backend.extend(item.delivery)
            except Exception as exc:
                # The store is unreachable; the lease may still hold (and after it ran out,
                # the token still decides: nobody may have taken the job). Try again soon.
                failed = f"lease renewal failed: {exc}"
                if not item.extend_failures:
                    log.warning(
                        "lease extension failed; retrying",
                        extra={
                            "event": "lease_extend_failed",
                            "job_id": item.delivery.job_id,
                            "error": str(exc),
                            "lease_left": round(self._lease_until(item) - sent, 2),
                        },
                    )
                item.extend_failures += 1
                continue
            item.extend_failures = 0
            if kept:
                item.lease_from = sent
                self._job_events.send(JobHeartbeat(item.delivery.job_id))
            elif not item.acked_by_claim:  # else its ack just landed: not lost, settled
                item.context.mark_lease_lost()
                log.warning(
                    "lease lost: another worker owns the job now",
                    extra={"event": "lease_lost", "job_id": item.delivery.job_id},
                )
        if failed:
            self._write_failed(failed)
            return min(next(self._lease_delays), self.settings.effective_heartbeat_interval)
        self._lease_delays = backoff()
        return None

    def _lease_until(self, running: Running) -> float:
        return lease_bound(running.lease_from, self._lease_ttl)

    def _retrying_write(self, running: Running, what: str, *, within_lease: bool) -> RetryingWrite:
        """The retry policy of one write for ``running`` (a settle: until it lands or a release;
        a checkpoint: while the lease surely holds)."""
        retry = RetryingWrite(
            what,
            running.delivery.job_id,
            stop=self._release_requested,
            on_failure=lambda reason: self._write_failed(reason, retry),
            lease_until=lambda: self._lease_until(running),
            until=(lambda: self._lease_until(running)) if within_lease else None,
            on_done=self._write_done,
        )
        return retry

    def _write_failed(self, reason: str, retry: RetryingWrite | None = None) -> None:
        self._write_trouble = reason
        if retry is not None and retry.failures == 1:
            with self._running_lock:
                self._retrying += 1  # readiness stays false until it lands (_report_health)
        self._store_failed(reason)

    def _write_done(self, retry: RetryingWrite) -> None:
        if retry.failures:
            with self._running_lock:
                self._retrying -= 1
