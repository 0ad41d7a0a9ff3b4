"""The upkeep thread of a worker's main process: heartbeats, health, leases, recovery scans.

The lease is renewed here, not in the work horse: a job that holds the GIL in C code must not
lose its lease while it is alive. A renewal that fails for longer than the lease stops the
attempt, since another worker may then run the job.
"""

from __future__ import annotations

import _thread
import contextlib
import importlib
import logging
import os
import time
from typing import Any, Final

import redis
import redis.exceptions
from rq.utils import as_text, now, utcparse
from rq.worker.base import WorkerStatus

from workerkit.engines.attempt import HEALTH_EVERY, HEARTBEAT_EVERY, Duty, Keeper
from workerkit.engines.presence_publisher import install_presence
from workerkit.engines.redis_presence import RedisPresenceStore
from workerkit.engines.rq.drain import Drain
from workerkit.engines.rq.outage import lease_bound
from workerkit.engines.rq.startup import UNREACHABLE
from workerkit.engines.rq.state import TICK, Attempt
from workerkit.events import (
    BatchingSender,
    Heartbeat,
    JobHeartbeat,
    QueueStats,
    StoreHealth,
    WorkerReady,
    client,
)

# datetime.strptime (rq.utils.utcparse, used in this thread) imports _strptime on its first call.
# It is imported here, with the worker, in the main thread before any thread starts: RQ forks its
# scheduler (and the work horses) from the main thread while this thread runs, and a fork while
# another thread is half-way through a module's first import leaves that module's import lock
# held for good in the child, whose own first strptime then hangs (RQ's scheduler did, about one
# start in six under load: it never enqueued a due job and ignored SIGTERM).
_STRPTIME: Any = importlib.import_module("_strptime")  # its lock is set below (no stubs)


def _fresh_strptime_lock() -> None:
    """In a forked child: _strptime's cache lock, new. Every strptime holds it while it parses;
    a fork while this thread parses a date left the child's copy held for good, and RQ's
    scheduler hung in its first strptime the same way (tests/compat, once in ~19 CI runs)."""
    _STRPTIME._cache_lock = _thread.allocate_lock()


os.register_at_fork(after_in_child=_fresh_strptime_lock)

__all__ = ("RECOVERY_GRACE", "RENEW_RETRY_EVERY", "WORKER_BEAT_EVERY", "Upkeep")

log = logging.getLogger("workerkit.engines.rq")


#: A plain RQ worker heartbeat (the worker key's TTL, ``worker_ttl`` + 60 s) at most this often;
#: RQ's loop asks for three per job (:meth:`Upkeep.heartbeat`).
WORKER_BEAT_EVERY: Final = 1.0
#: How soon a lease renewal that failed (Redis unreachable) is tried again.
RENEW_RETRY_EVERY: Final = 1.0
#: After Redis was unreachable, the worker's recovery scan waits this long before it requeues
#: abandoned attempts: workers that hold results they could not write during the outage settle
#: them first (their retries come at most 1 s apart), where the scan would take their expired
#: leases and run those jobs again.
RECOVERY_GRACE: Final = 3.0


#: The longest the upkeep thread sleeps (its duties' cadence), unless a quarter of the lease
#: renewal interval is shorter: a job begun while it sleeps has its first renewal due H later.
UPKEEP_EVERY: Final = 1.0


def upkeep_every(heartbeat_interval: float) -> float:
    """The upkeep thread's cadence for a lease renewed every ``heartbeat_interval`` (H)."""
    return min(UPKEEP_EVERY, max(TICK, heartbeat_interval / 4))


class Upkeep(Drain):
    """The upkeep thread; it also turns the stop signals into the drain's steps."""

    _wk_renew_retry_at = 0.0  # monotonic; set after a renewal failed
    _wk_store_down = False  # Redis was seen unreachable, and not reachable since
    _wk_scan_after = 0.0  # monotonic; no recovery scan before (RECOVERY_GRACE)
    _wk_presence: Any = None  # the presence publisher (workerkit.engines.presence_publisher)
    _wk_beat_at: float | None = None  # monotonic; the last plain worker heartbeat sent
    _wk_state_sent: tuple[str, float] | None = None  # the worker state last written, and when

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)  # type: ignore[misc]
        self._wk_pid = os.getpid()
        self._wk_events = client("worker")
        self._wk_job_events = BatchingSender(self._wk_events)
        self._wk_events.on_command(self._wk_on_command)
        # A stop signal wakes the thread (wake_runs); the lease renewal says when it is due
        # next. Nothing else needs the thread sooner than `every`, so an idle worker's thread
        # wakes once a second, not twenty times (each wake costs ~0.1-0.3 ms of CPU here).
        every = upkeep_every(self.wk_settings.effective_heartbeat_interval)
        duties = [
            Duty("signals", every, self._wk_check_signals),
            Duty("deadlines", TICK, self._wk_local_deadlines, when=self._wk_deadlines_are_local),
            Duty("heartbeat", HEARTBEAT_EVERY, self._wk_heartbeat),
            Duty("health", HEALTH_EVERY, self._wk_report_health),
            Duty("renew", every, self._wk_renew_due),
            Duty("recovery", self._wk_scan_every, self._wk_scan, when=self._wk_scanning),
        ]
        self._wk_upkeep = Keeper(
            duties, log=log, name="workerkit-rq-upkeep", max_wait=every, wake_runs=("signals",)
        )
        self._wk_upkeep.start()
        self._wk_install_presence()

    def _wk_install_presence(self) -> None:
        """Publish the supervisor's presence record of this worker into its Redis (dashboard)."""
        store_client = self._wk_redis  # the worker's own server (also under --url)
        self._wk_presence = install_presence(
            self._wk_events, lambda: RedisPresenceStore(store_client)
        )

    def teardown(self) -> None:
        if not self._is_horse:
            self._wk_push_back_on_exit()
            self._wk_job_events.flush()  # the last jobs' events, before the process exits
            if self._wk_presence is not None:
                with contextlib.suppress(Exception):
                    self._wk_presence.close()  # a clean exit: the record goes
            if self._wk_upkeep is not None:
                self._wk_upkeep.stop(timeout=2.0)
            with contextlib.suppress(redis.exceptions.RedisError):
                self._wk_redis.delete(self._wk_wake_key)
        try:
            super().teardown()  # type: ignore[misc]
        except UNREACHABLE as exc:
            # RQ's death registration: the worker's key expires by itself (worker_ttl + 60 s).
            log.warning(
                "cannot register the worker's exit: Redis unreachable",
                extra={"event": "store_unavailable", "reason": f"{type(exc).__name__}: {exc}"},
            )

    # --- RQ's own writes between jobs: a Redis restart must not end the worker ----------------

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's worker heartbeat: the worker key's TTL (``worker_ttl`` + 60 s unless ``timeout``
        says) and its ``last_heartbeat``; two commands, sent here in one round trip.

        RQ's loop beats three times per job: at the top of its dequeue, after the pop and after
        the job, on top of the beats in its pipelines. A plain beat (the default TTL) within
        :data:`WORKER_BEAT_EVERY` of the last one sent is skipped: the key still lives at least
        ``worker_ttl`` + 59 s, and ``last_heartbeat`` is at most a second old. A beat with its own
        TTL (RQ's, shorter, as a job starts) makes the next plain one go out. One missed while
        Redis is down is harmless (the key outlives it); RQ's loop ends the worker on any error.
        """
        if pipeline is not None:
            super().heartbeat(timeout, pipeline)
            if timeout is not None:
                self._wk_beat_at = None
            return
        now_ = time.monotonic()
        beat_at = self._wk_beat_at
        if timeout is None and beat_at is not None and now_ - beat_at < WORKER_BEAT_EVERY:
            return
        with contextlib.suppress(*UNREACHABLE):
            with self.connection.pipeline(transaction=False) as beat:
                super().heartbeat(timeout, beat)
                beat.execute()
            self._wk_beat_at = now_ if timeout is None else None

    def set_state(self, state: str, pipeline: Any = None) -> None:
        """RQ's worker state; a state this worker wrote itself in the last
        :data:`WORKER_BEAT_EVERY`, with no write through a pipeline since, is not written again
        (RQ writes ``idle`` after each job and again as it dequeues the next)."""
        if pipeline is not None:
            super().set_state(state, pipeline)
            self._wk_state_sent = None  # it lands with the pipeline, or not at all
            return
        sent = self._wk_state_sent
        if sent is not None and sent[0] == state and time.monotonic() - sent[1] < WORKER_BEAT_EVERY:
            return
        with contextlib.suppress(*UNREACHABLE):
            super().set_state(state)
            self._wk_state_sent = (state, time.monotonic())

    def _wk_idle(self) -> None:
        """After a job: the worker state ``idle`` and RQ's plain heartbeat, one round trip (RQ's
        loop beats right after; that beat, and the ``idle`` its dequeue writes, are then
        skipped)."""
        with contextlib.suppress(*UNREACHABLE):
            with self.connection.pipeline(transaction=False) as writes:
                super().set_state(WorkerStatus.IDLE, writes)
                super().heartbeat(None, writes)
                writes.execute()
            self._wk_beat_at = sent_at = time.monotonic()
            self._wk_state_sent = (WorkerStatus.IDLE, sent_at)

    def run_maintenance_tasks(self) -> None:
        """RQ's maintenance (the recovery scan first); skipped, and tried again, while Redis is
        down."""
        try:
            super().run_maintenance_tasks()
        except UNREACHABLE as exc:
            log.warning(
                "maintenance skipped: Redis unreachable",
                extra={"event": "maintenance_skipped", "reason": f"{type(exc).__name__}: {exc}"},
            )

    # --- the upkeep duties, in the order they run -----------------------------------------

    def _wk_check_signals(self) -> None:
        if self._wk_signals == self._wk_signals_seen:
            return
        first = self._wk_signals_seen == 0
        self._wk_signals_seen = self._wk_signals
        self._wk_begin_stopping()
        if not first and not self._wk_supervised:
            # A second signal never skips the release; it makes it happen now.
            self._wk_request_stop_jobs()
            self._wk_release_now()

    def _wk_deadlines_are_local(self) -> bool:
        # Stopping without a supervisor: the worker keeps the shutdown deadlines itself.
        return self._wk_stop_at is not None and not self._wk_supervised

    def _wk_heartbeat(self) -> None:
        self._wk_send(Heartbeat(running=1 if self._wk_attempt else 0))

    def _wk_renew_due(self) -> float | None:
        """Renew the lease of the attempt in hand when due; seconds until the next is due (None:
        no attempt; one begun meanwhile is seen within the duty's cadence, a quarter of H)."""
        attempt = self._wk_attempt
        if attempt is None or attempt.lease_lost:
            return None  # a lost lease is final: nothing to renew until the attempt ends
        renew_every = self.wk_settings.effective_heartbeat_interval
        now_ = time.monotonic()
        if now_ >= max(attempt.renewed_at() + renew_every, self._wk_renew_retry_at):
            self._wk_renew(attempt, now_)
        due = max(attempt.renewed_at() + renew_every, self._wk_renew_retry_at)
        return max(0.0, due - time.monotonic())

    def _wk_scanning(self) -> bool:
        return not self._wk_stopping

    def _wk_scan(self) -> None:
        # Its count is not a delay (a duty's return value is one). While Redis is down the
        # health duty reports it; a traceback a second would only bury that line.
        with contextlib.suppress(*UNREACHABLE):
            self.wk_recover_abandoned()

    def _wk_report_health(self) -> None:
        try:
            self._wk_redis.ping()
            ok, reason = True, "redis reachable"
        except redis.exceptions.RedisError as exc:
            ok, reason = False, f"redis unavailable: {type(exc).__name__}"
        self._wk_note_store(ok, reason, report=False)
        self._wk_send(StoreHealth(ok, reason))
        if ok and not self._wk_ready_sent:
            self._wk_ready_sent = True
            queues = tuple(self.queue_names())
            self._wk_send(
                WorkerReady(engine="rq", queues=queues, concurrency=1, worker_id=self.name)
            )
            log.info("worker ready", extra={"event": "worker_ready", "queues": self.queue_names()})
        if ok:
            with contextlib.suppress(Exception):
                depth, oldest = self.wk_queue_stats()
                self._wk_send(QueueStats(depth, oldest))

    def _wk_note_store(self, ok: bool, reason: str, *, report: bool = True) -> None:
        """Redis seen reachable or not: readiness follows at once; after an outage, the grace."""
        if ok == (not self._wk_store_down):
            return
        self._wk_store_down = not ok
        if ok:
            self._wk_scan_after = time.monotonic() + RECOVERY_GRACE
        if report:
            self._wk_send(StoreHealth(ok, reason))

    def wk_queue_stats(self) -> tuple[dict[str, int], dict[str, float]]:
        """Depth and the age of the oldest waiting job, per queue."""
        queues = self.queues
        with self._wk_redis.pipeline(transaction=False) as pipeline:
            for queue in queues:
                pipeline.llen(queue.key)
                pipeline.lindex(queue.key, 0)
            replies = pipeline.execute()
        depth: dict[str, int] = {}
        oldest: dict[str, float] = {}
        heads: list[tuple[str, str]] = []
        for index, queue in enumerate(queues):
            depth[queue.name] = int(replies[2 * index])
            oldest[queue.name] = 0.0
            head = replies[2 * index + 1]
            if head is not None:
                heads.append((queue.name, bytes(head).decode("utf-8", "replace")))
        if heads:
            stamps = self._wk_redis.pipeline(transaction=False)
            for _, job_id in heads:
                stamps.hget(f"rq:job:{job_id}", "enqueued_at")
            for (name, _), raw in zip(heads, stamps.execute(), strict=True):
                if raw:
                    with contextlib.suppress(ValueError):
                        oldest[name] = max(0.0, (now() - utcparse(as_text(raw))).total_seconds())
        return depth, oldest

    def _wk_renew(self, attempt: Attempt, now_: float) -> None:
        try:
            kept = self._wk_leases.renew(attempt.keys)
        except redis.exceptions.RedisError as exc:
            self._wk_note_store(
                False, f"redis unavailable: lease renewal failed: {type(exc).__name__}"
            )
            # The lease may still hold; but once it has surely expired another worker may run
            # the job, so a running job must stop (fencing by time, not only by token). A job
            # whose code has ended is left to its settle: fenced by the token, it lands only if
            # nobody took the job, so the renewal is only tried again.
            bound = lease_bound(attempt.renewed_at(), self._wk_lease_ttl)
            if attempt.settling or now_ < bound:
                # Again in a second (not every tick while Redis is down), and at the latest
                # when the lease runs out, so that its loss is seen on time.
                self._wk_renew_retry_at = now_ + RENEW_RETRY_EVERY
                if not attempt.settling:
                    self._wk_renew_retry_at = min(self._wk_renew_retry_at, bound)
                log.warning(
                    "lease renewal failed; retrying",
                    extra={
                        "event": "lease_extend_failed",
                        "job_id": attempt.keys.job_id,
                        "error": str(exc),
                    },
                )
                return
            kept = False
        self._wk_note_store(True, "redis reachable")
        if kept:
            attempt.renewed(now_)
            self._wk_publish_lease(now_)
            self._wk_job_events.send(JobHeartbeat(attempt.keys.job_id))
            return
        if attempt.settling:
            # Its own fenced write tells whether the job is still its (a lease that expired
            # while Redis was down is taken again if nobody took the job meanwhile).
            self._wk_renew_retry_at = now_ + RENEW_RETRY_EVERY
            return
        if attempt.lease_lost or attempt.horse_done.is_set():
            return
        attempt.lease_lost = True
        log.warning(
            "lease lost: the job may run elsewhere now; stopping this attempt",
            extra={"event": "lease_lost", "job_id": attempt.keys.job_id},
        )
        self._wk_interrupt(attempt)

    def wk_recover_abandoned(self) -> int:
        """Requeue (or fail) abandoned attempts of this worker's queues; return how many.

        Due deferred jobs of the queues are put back too (:meth:`Leases.promote`). Not while
        Redis is unreachable, nor for :data:`RECOVERY_GRACE` after it came back.
        """
        try:
            self._wk_redis.ping()
        except redis.exceptions.RedisError as exc:
            self._wk_note_store(False, f"redis unavailable: {type(exc).__name__}")
            return 0
        self._wk_note_store(True, "redis reachable")
        if time.monotonic() < self._wk_scan_after:
            return 0
        return self._wk_recovery.scan(self.queue_names(), self.name, self._wk_scan_every)

    def clean_registries(self) -> None:
        # RQ's maintenance fails every StartedJobRegistry entry whose score ran out; our own
        # recovery must look first, so that an abandoned workerkit attempt is requeued instead.
        self.wk_recover_abandoned()
        super().clean_registries()  # type: ignore[misc]
