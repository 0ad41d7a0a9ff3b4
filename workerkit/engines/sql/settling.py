"""How the sql worker settles a delivery: once, under its lock, with the one matching write.

:class:`Settling` is a part of :class:`~workerkit.engines.sql.worker.NativeWorker`: each write
returns the outcome it stands for; a job's own thread retries a write through a store outage,
the main thread (a release, a timeout) tries once. A success's ack goes first to the fetcher's
next claim (:mod:`.folding`), which finishes the job, and is written alone only when the fetcher
did not take it or handed it back.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from workerkit.engines.sql.claim import Ack
from workerkit.engines.sql.rules import dump_json
from workerkit.errors import LeaseLost
from workerkit.idempotency import outcome_of

if TYPE_CHECKING:
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

    # Implemented by the worker or another of its parts; declared for the type checker only, as
    # a method here would shadow the implementation of a part after this one in the bases.
    if TYPE_CHECKING:

        def _retrying_write(
            self, running: Running, what: str, *, within_lease: bool
        ) -> RetryingWrite:
            raise NotImplementedError

        def _finish(self, running: Running) -> None:
            raise NotImplementedError

    # Each settling write returns the outcome it stands for.

    def _ack(self, running: Running, result: Any) -> Outcome:
        self.backend.ack(running.delivery, result)
        return _succeeded(running)

    def _offer_ack(self, running: Running, result: Any) -> bool:
        """Hand a success's ack to the fetcher's next claim; True when it took it. The settle
        lock stays held until that claim's write, which finishes the job (:meth:`_ack_folded`):
        the job's thread goes on to its next job meanwhile. False: the fold is closed (no claim
        soon), the result does not encode here, or the job was taken back (already settled);
        the caller settles as usual."""
        if not self._fold.enabled:
            return False
        delivery = running.delivery
        try:
            encoded = dump_json(result, f"the result of task {delivery.task!r}")
        except Exception:
            return False  # the job thread's own ack says why
        running.lock.acquire()
        if running.settled_as is not None:
            running.lock.release()
            return False
        # Before the offer: once the claim's write lands, a renewal would find no lease.
        running.acked_by_claim = True
        ack = Ack(delivery.job_id, delivery.token, encoded)
        batch = self._fold.offer(ack, lambda matched: self._ack_folded(running, result, matched))
        if batch is None:
            running.acked_by_claim = False
            running.lock.release()
            return False
        if len(batch.acks) == 1:
            # The fetcher claims ACK_WAIT after a batch's first ack at most (worker.py); the
            # later ones ride along without waking it.
            self._slot_freed.set()
        return True

    def _ack_folded(self, running: Running, result: Any, matched: bool | None) -> None:
        """The claim that carried ``running``'s ack wrote it (``matched``: whether its fence
        matched) or handed it back (None): then a thread of its own writes it, retried through
        an outage as the job's thread would. Called once, the settle lock held."""
        if matched is None:
            running.acked_by_claim = False  # written alone: its lease is renewed meanwhile
            threading.Thread(
                target=self._ack_alone,
                args=(running, result),
                name=f"job-{running.delivery.job_id}-ack",
                daemon=True,
            ).start()
            return
        running.settled_as = _succeeded(running) if matched else "lease_lost"
        running.lock.release()
        self._finish(running)

    def _ack_alone(self, running: Running, result: Any) -> None:
        try:
            self._settle(running, lambda r: self._ack(r, result), held=True)
        finally:
            self._finish(running)

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
    ) -> bool:
        """Settle the delivery once, recording the outcome; False when it already was.

        ``patient`` (a job's own thread): a store that is unavailable is retried until the write
        lands, the fence says the job is no longer ours, or the worker releases. The main
        thread is not patient: it tries once, and waits ``wait`` seconds at most for a settle
        in progress on the job's thread (which stops retrying at a release). ``held``: the
        caller holds ``running.lock`` already (released here).
        """
        if not held and not running.lock.acquire(timeout=-1 if patient else wait):
            return False
        try:
            if running.settled_as is not None:
                return False
            running.settled_as = self._write_settle(running, write, patient=patient)
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
