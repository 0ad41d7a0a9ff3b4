"""How the sql worker settles a delivery: once, under its lock, with the one matching write.

:class:`Settling` is a part of :class:`~workerkit.engines.sql.worker.NativeWorker`: each write
returns the outcome it stands for; a job's own thread retries a write through a store outage,
the main thread (a release, a timeout) tries once. A success's ack goes first to the fetcher's
next claim (:mod:`.folding`), and is written by the job thread only when the fetcher did not.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from workerkit.engines.sql.claim import Ack
from workerkit.engines.sql.rules import dump_json
from workerkit.errors import LeaseLost
from workerkit.idempotency import outcome_of

if TYPE_CHECKING:
    import threading

    from workerkit.app import App
    from workerkit.engines.base import QueueBackend
    from workerkit.engines.sql.folding import AckFold
    from workerkit.engines.sql.outage import RetryingWrite
    from workerkit.engines.sql.running import Running
    from workerkit.events import Outcome
    from workerkit.settings import Settings

__all__ = ("Settling",)

log = logging.getLogger("workerkit.engines.sql.worker")


class Settling:
    """The settling writes of the sql worker (a mixin of ``NativeWorker``)."""

    app: App
    settings: Settings
    backend: QueueBackend
    _fold: AckFold
    _slot_freed: threading.Event

    def _retrying_write(self, running: Running, what: str, *, within_lease: bool) -> RetryingWrite:
        raise NotImplementedError

    # Each settling write returns the outcome it stands for.

    def _ack(self, running: Running, result: Any) -> Outcome:
        self.backend.ack(running.delivery, result)
        return _succeeded(running)

    def _folded_ack(self, result: Any) -> Callable[[Running], Outcome | None]:
        """The ack written by the fetcher's next claim; None when it was not (refused, handed
        back, or not encodable here): then the job thread writes it itself."""

        def write(running: Running) -> Outcome | None:
            if not self._fold.enabled:
                return None
            delivery = running.delivery
            try:
                encoded = dump_json(result, f"the result of task {delivery.task!r}")
            except Exception:
                return None  # the job thread's own ack says why
            # Before the offer: once the claim's write lands, a renewal would find no lease.
            running.acked_by_claim = True
            batch = self._fold.offer(Ack(delivery.job_id, delivery.token, encoded))
            if batch is not None:
                self._slot_freed.set()
            matched = None if batch is None else batch.wait(delivery.job_id)
            if matched is None:
                running.acked_by_claim = False  # the job thread writes it, the lease kept
                return None
            return _succeeded(running) if matched else "lease_lost"

        return write

    def _defer(self, running: Running, delay: float, reason: str) -> Outcome:
        self.backend.defer(running.delivery, time.time() + max(0.0, delay), reason)
        return "deferred"

    def _fail(self, running: Running, error: str) -> Outcome:
        self.backend.fail(running.delivery, error)
        return "failed"

    def _retry_or_fail(self, running: Running, error: str) -> Outcome:
        delivery = running.delivery
        task = self.app.tasks.get(delivery.task)
        if task is None or delivery.attempt >= delivery.max_attempts:
            return self._fail(running, error)
        self.backend.retry(delivery, error, time.time() + task.retry_delay(delivery.attempt))
        return "retried"

    def _release(self, running: Running) -> Outcome:
        with contextlib.suppress(Exception):
            running.context.flush()  # a checkpoint kept for later is saved before the release
        self.backend.release(running.delivery)
        return "released"

    def _settle(
        self,
        running: Running,
        write: Callable[[Running], Outcome],
        *,
        patient: bool = True,
        wait: float = 0.0,
        held: bool = False,
        first: Callable[[Running], Outcome | None] | None = None,
    ) -> bool:
        """Settle the delivery once, recording the outcome; False when it already was.

        ``patient`` (a job's own thread): a store that is unavailable is retried until the write
        lands, the fence says the job is no longer ours, or the worker releases. The main
        thread is not patient: it tries once, and waits ``wait`` seconds at most for a settle
        in progress on the job's thread (which stops retrying at a release). ``held``: the
        caller holds ``running.lock`` already (released here). ``first``: a write tried
        before ``write`` (the folded ack), None when it wrote nothing.
        """
        if not held and not running.lock.acquire(timeout=-1 if patient else wait):
            return False
        try:
            if running.settled_as is not None:
                return False
            outcome = first(running) if first is not None else None
            running.settled_as = outcome or self._write_settle(running, write, patient=patient)
            return True
        finally:
            running.lock.release()

    def _write_settle(
        self, running: Running, write: Callable[[Running], Outcome], *, patient: bool
    ) -> Outcome:
        retry = self._retrying_write(running, "settle", within_lease=False)
        retry.once = not patient  # the main thread never blocks on the store
        try:
            return retry.run(lambda: write(running))
        except LeaseLost:
            return "lease_lost"
        except Exception as exc:
            # Not a store outage (or the worker is releasing): the lease will expire and the
            # job will be claimed again.
            log.warning(
                "could not settle job",
                extra={
                    "event": "settle_failed",
                    "job_id": running.delivery.job_id,
                    "error": str(exc),
                },
            )
            return "lease_lost"


def _succeeded(running: Running) -> Outcome:
    replayed = outcome_of(running.context) == "replayed"
    return "skipped_duplicate" if replayed else "succeeded"
