"""The sql worker's prefetch: jobs claimed ahead while the current ones run, held unstarted.

At concurrency 1 a job's critical path was: it finishes, its ack goes to the fetcher, one
``ack_and_claim`` round trip, the next job starts. With ``prefetch`` jobs held here (the setting,
default 4, as Celery's), the next job starts as soon as a slot frees, and the buffer is refilled
once it is empty, by one claim that carries the acks of the jobs finished since (so with 4, one
round trip per four jobs, beside the last held job's run). Acks wait for that claim at most
``ACK_WAIT`` (worker.py): a long job's ack is not held back by the next job. Celery prefetches too
(``worker_prefetch_multiplier``, 4 by default); unlike its prefetched messages, a held job here is
leased and fenced like a running one:

- its lease is renewed with the running jobs' (:meth:`Prefetching._renew_prefetched`); a lease
  found lost drops it (someone else has the job);
- it is put back to waiting at once, its attempt given back (a fenced release), when the worker
  stops fetching or releases, when its queue is paused, when it waited :data:`HOLD` with every
  slot busy (long jobs: another worker may be idle), and when the store is not ready (tried,
  kept while it cannot be written, dropped once its lease may have run out);
- it is never started after the worker stopped fetching;
- the supervisor hears of it (``job_prefetched``, at once) and puts it back after a kill with
  its attempt given back; ``prefetch_returned`` when the worker put it back or dropped it. It
  is not a started job: no ``job_started``, no metrics, no log line at info level.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workerkit.engines.attempt import lease_bound
from workerkit.errors import LeaseLost
from workerkit.events import BatchingSender, JobPrefetched, PrefetchReturned

if TYPE_CHECKING:
    from workerkit.engines.base import Delivery, QueueBackend
    from workerkit.engines.sql.running import Running
    from workerkit.events import Event, EventClient

__all__ = ("HOLD", "PUT_BACK_WAIT", "Prefetched", "Prefetching")

log = logging.getLogger("workerkit.engines.sql.worker")

#: How long a held job waits for a slot while every slot stays busy before it goes back to the
#: queue (seconds): jobs held behind long ones would wait while other workers may be idle.
HOLD = 1.0

#: How long a put-back of every held job waits for a claim or another put-back in progress
#: (seconds; :meth:`Prefetching._put_back_prefetched`).
PUT_BACK_WAIT = 1.0


@dataclass(eq=False)
class Prefetched:
    """A claimed job held for the next free slot."""

    delivery: Delivery
    lease_from: float  # monotonic, sent time of the request that last set the lease
    held_at: float = field(default_factory=time.monotonic)


class Prefetching:
    """The prefetch buffer of the sql worker (a mixin of ``NativeWorker``). Thread-safe."""

    backend: QueueBackend
    events: EventClient
    _job_events: BatchingSender | EventClient
    _lease_ttl: float
    _stopping: threading.Event
    _slot_freed: threading.Event
    _claim_lock: threading.Lock
    _paused: Any  # pauses.WorkerPauses | None
    prefetch: int
    _holding_back: bool
    _held: deque[Prefetched]
    _held_lock: threading.Lock

    def _init_prefetch(self, size: int) -> None:
        self.prefetch = size
        self._holding_back = False
        self._held = deque()
        self._held_lock = threading.Lock()

    @property
    def prefetch_room(self) -> int:
        """How many more jobs the buffer takes (0 once the worker stopped fetching, and after a
        put-back of jobs held :data:`HOLD` seconds, until a slot frees)."""
        if self._stopping.is_set() or self._holding_back:
            return 0
        return max(0, self.prefetch - len(self._held))

    def _tend_held(self) -> float:
        """While every slot is busy: put back the held jobs of paused queues, and every held
        job once the oldest waited :data:`HOLD` seconds (the running jobs are long: other
        workers may be idle), claiming no more ahead until a slot frees. The seconds until the
        next such check is due (inf: nothing held)."""
        if not self._held:
            return math.inf
        if self._paused is not None:
            self._put_back_paused(self._claim_queues())
        with self._held_lock:
            oldest = self._held[0].held_at if self._held else math.inf
        left = oldest + HOLD - time.monotonic()
        if left > 0:
            return left
        self._holding_back = True
        self._put_back_prefetched("slots_busy")
        return math.inf

    def _send_job_event(self, event: Event, *, now: bool = False) -> None:
        sender = self._job_events
        if now and isinstance(sender, BatchingSender):
            sender.send_now(event)
        else:
            sender.send(event)

    # Implemented by the worker or another of its parts; declared for the type checker only, as
    # a method here would shadow the implementation of a part after this one in the bases.
    if TYPE_CHECKING:

        def _launch(self, begun: list[Running]) -> None:
            raise NotImplementedError

        def _claim_queues(self) -> list[str]:
            raise NotImplementedError

        def _free_slots(self) -> int:
            raise NotImplementedError

        def _begin(self, delivery: Delivery, sent: float, *, gathered: bool = False) -> Running:
            raise NotImplementedError

    def _start_prefetched(self) -> None:
        """Start held jobs in the free slots (never after a stop): the fetcher's."""
        if self._free_slots() <= 0:
            return
        self._holding_back = False  # a slot freed: claim ahead again
        if not self._held:
            return
        begun: list[Running] = []
        with self._claim_lock:  # a stop's put-back, or a claim, is not halfway
            queues = self._claim_queues()
            while (running := self._begin_held(queues, gathered=True)) is not None:
                begun.append(running)
        self._launch(begun)

    def _take_next_held(self) -> tuple[Running, str] | None:
        """A held job for the calling job thread to run next (its job ended), or None: then the
        fetcher is woken to start or claim one. Never waits for a claim in progress (which
        starts its jobs in the free slots itself)."""
        running = None
        if self._held and self._claim_lock.acquire(blocking=False):
            try:
                running = self._begin_held(self._claim_queues(), gathered=False)
            except Exception:
                log.exception(
                    "starting a held job failed", extra={"event": "prefetch_start_failed"}
                )
            finally:
                self._claim_lock.release()
        if running is None:
            self._slot_freed.set()
            return None
        return running, f"job-{running.delivery.job_id}"

    def _begin_held(self, queues: list[str], *, gathered: bool) -> Running | None:
        """The oldest held job begun in a free slot, or None (no free slot, none to start, a
        stop). The caller holds the claim lock: the slots are counted under it, as a job
        thread and the fetcher may both be starting one."""
        if self._free_slots() <= 0:
            return None
        self._holding_back = False
        item = self._next_prefetched(queues)
        if item is None:
            return None
        return self._begin(item.delivery, item.lease_from, gathered=gathered)

    def _hold(self, delivery: Delivery, sent: float) -> None:
        """Keep a claimed job for the next slot; the supervisor hears of it at once."""
        with self._held_lock:
            self._held.append(Prefetched(delivery, sent))
        # Gathered: the caller sends the claim's events at once (:meth:`_flush_held`), in one
        # write with the first start's, before any job starts.
        self._send_job_event(JobPrefetched(delivery.job_id, delivery.queue, delivery.ref()))
        log.debug("job prefetched", extra={"event": "job_prefetched", "job_id": delivery.job_id})

    def _flush_held(self) -> None:
        """Write the gathered events now: a worker killed right after must be known to hold
        its prefetched jobs (a start's ``send_now`` does the same)."""
        if isinstance(self._job_events, BatchingSender):
            self._job_events.flush()

    def _next_prefetched(self, queues: list[str]) -> Prefetched | None:
        """The oldest held job to start now; one of a paused queue, or whose lease may have run
        out, is put back (or dropped) instead."""
        while True:
            with self._held_lock:
                # Checked at each turn: a put-back below is a round trip, and a SIGTERM during
                # it must not let the next held job start.
                if not self._held or self._stopping.is_set():
                    return None
                item = self._held.popleft()
            if item.delivery.queue not in queues:
                self._put_back([item], "queue_paused")
                continue
            if lease_bound(item.lease_from, self._lease_ttl) <= time.monotonic():
                # Maybe not ours any more: never started. A fenced release still gives its
                # attempt back if nobody claimed it since (an expired lease keeps its token).
                self._put_back([item], "lease_expired")
                continue
            return item

    def _put_back_paused(self, queues: list[str]) -> None:
        """Put back the held jobs of queues paused since they were claimed (the fetcher's;
        under the claim lock, as :meth:`_put_back_prefetched` says why)."""
        with self._claim_lock:
            with self._held_lock:
                paused = [item for item in self._held if item.delivery.queue not in queues]
                for item in paused:
                    self._held.remove(item)
            self._put_back(paused, "queue_paused")

    def _put_back_prefetched(self, reason: str) -> int:
        """Put every held job back to waiting (attempt given back); how many were.

        Under the claim lock, as the other put-backs of held jobs: two threads may put back at
        once (the fetcher after ``HOLD``, the main thread at a release or its drained exit), and
        the one that finds the buffer emptied by the other must wait for its writes, or the
        worker could exit with them still in flight (the supervisor would release them after
        the exit). The main thread must not block on the store for long: it waits for the lock
        :data:`PUT_BACK_WAIT` at most, then goes on as if it had it."""
        locked = self._claim_lock.acquire(timeout=PUT_BACK_WAIT)
        try:
            with self._held_lock:
                items = list(self._held)
                self._held.clear()
            return self._put_back(items, reason)
        finally:
            if locked:
                self._claim_lock.release()

    def _put_back(self, items: list[Prefetched], reason: str) -> int:
        kept: list[Prefetched] = []
        released = 0
        for item in items:
            try:
                self.backend.release(item.delivery)  # fenced; the attempt is given back
                released += 1
            except Exception as exc:
                if (
                    not isinstance(exc, LeaseLost)
                    and not self._stopping.is_set()
                    and lease_bound(item.lease_from, self._lease_ttl) > time.monotonic()
                ):
                    # The store is away: kept (and renewed) while its lease surely holds.
                    kept.append(item)
                    continue
                log.warning(
                    "could not put a prefetched job back; its lease will expire",
                    extra={
                        "event": "prefetch_release_failed",
                        "job_id": item.delivery.job_id,
                        "error": str(exc),
                    },
                )
                if self._stopping.is_set() and not isinstance(exc, LeaseLost):
                    # Still the supervisor's to release after this worker exits (it gives the
                    # attempt back): no prefetch_returned, which would take it off its list.
                    continue
            self._returned(item, reason)
        if kept:
            with self._held_lock:
                self._held.extendleft(reversed(kept))
        return released

    def _returned(self, item: Prefetched, reason: str) -> None:
        self._send_job_event(PrefetchReturned(item.delivery.job_id))
        log.info(
            "prefetched job put back",
            extra={
                "event": "prefetch_returned",
                "job_id": item.delivery.job_id,
                "reason": reason,
            },
        )

    def _renew_prefetched(self) -> str:
        """Renew the held jobs' leases; the failure's reason, or "" (the lease keeper's duty)."""
        with self._held_lock:
            items = list(self._held)
        failed = ""
        for item in items:
            sent = time.monotonic()
            try:
                kept = self.backend.extend(item.delivery)
            except Exception as exc:
                failed = f"lease renewal failed: {exc}"
                continue
            if kept:
                item.lease_from = sent
                continue
            with self._held_lock:
                if item not in self._held:
                    continue  # started or put back meanwhile
                self._held.remove(item)
            self._returned(item, "lease_lost")
        return failed
