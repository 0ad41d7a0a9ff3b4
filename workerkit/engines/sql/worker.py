"""The sql engine's worker loop: claims an App's jobs from a queue backend and runs them.

``python -m workerkit.engines.sql``, and what :func:`workerkit.testing.run_jobs` runs in-process:
a main thread, a fetcher, two keepers and a thread per running job (:mod:`.slots`); every
delivery is settled once, under its own lock. The threads and why: docs/engines/sql.md ("The
worker").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from workerkit import events as events_module
from workerkit.app import App, decode_payload
from workerkit.engines.attempt import (
    HEALTH_EVERY,
    HEARTBEAT_EVERY,
    Defer,
    Duty,
    Fail,
    Keeper,
    Propagate,
    Release,
    Retried,
    RetryOrFail,
    StandDown,
    check_arguments,
    release_each,
    verdict_for,
)
from workerkit.engines.sql import pauses, retention
from workerkit.engines.sql.folding import AckFold, Batch
from workerkit.engines.sql.leases import LeaseKeeping
from workerkit.engines.sql.outage import (
    ClaimPause,
    backoff,
    recovery_grace,
    retrying_sink,
)
from workerkit.engines.sql.prefetch import Prefetching
from workerkit.engines.sql.queue import SqlQueue
from workerkit.engines.sql.running import RULES, JobTimedOut, PermanentFailure, Running
from workerkit.engines.sql.settling import Settling
from workerkit.engines.sql.slots import Slots
from workerkit.engines.wakepipe import WakePipe
from workerkit.errors import JobInterrupted, PayloadError, SchemaOutOfDate, StoreError
from workerkit.events import (
    BatchingSender,
    CheckpointSaved,
    Heartbeat,
    JobFinished,
    JobStarted,
    Outcome,
    QueueStats,
    StoreHealth,
    WorkerReady,
    WorkerStopping,
)
from workerkit.job import JobContext

if TYPE_CHECKING:
    from workerkit.engines.base import Delivery, QueueBackend
    from workerkit.events import Command, Event, EventClient
    from workerkit.settings import Settings

__all__ = ("NativeWorker",)

log = logging.getLogger(__name__)

TICK = 0.05  # how often the main thread looks at its flags while jobs run or it stops
# Once no job has run for IDLE_AFTER, the main thread waits up to IDLE_WAIT at a time instead
# (each wake costs ~0.1-0.3 ms of CPU here): a stop, a release or a job's start wakes it.
IDLE_AFTER = 1.0
IDLE_WAIT = 1.0
ACK_WAIT = 0.002  # how long acks wait for the next slot to free while a prefetched job is held
_RELEASE_WAIT = 1.0  # how long a release waits for a settle in progress on the job's thread


class NativeWorker(Settling, Prefetching, LeaseKeeping):
    """Claims and runs jobs of an :class:`~workerkit.app.App` with bounded concurrency."""

    _been_ready = False
    _main_idle = False  # the main thread is in its idle wait: a job's start must wake it
    _busy_at = 0.0  # monotonic: when the main thread last saw a job or a stop (0: idle at start)

    def __init__(
        self,
        app: App,
        settings: Settings,
        *,
        backend: QueueBackend | None = None,
        events: EventClient | None = None,
        worker_id: str | None = None,
        stop_children: Callable[[], object] | None = None,
    ) -> None:
        self.app = app
        # The worker process's: stops every subprocess its jobs started (None in-process).
        self._stop_children = stop_children
        self.settings = settings
        self.backend = backend if backend is not None else app.backend
        self.events = events if events is not None else events_module.EventClient(None, role="")
        # A job's events (started, finished, checkpoint, lease renewed), in batches under load:
        # one write per batch instead of two per job, for this process and the supervisor.
        self._job_events: BatchingSender | EventClient = self.events
        if isinstance(self.events, events_module.EventClient):  # not a test's recorder
            self._job_events = BatchingSender(self.events)
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.queues = settings.queue_names
        self.concurrency = settings.concurrency
        self._running: dict[str, Running] = {}
        self._running_lock = threading.Lock()
        # Held while a claim, a start of held jobs or a put-back of them is in progress.
        self._claim_lock = threading.Lock()
        self._slot_freed = threading.Event()
        self._stopping = threading.Event()
        self._release_requested = threading.Event()
        self._jobs_stop_requested = threading.Event()
        self._main_wake = WakePipe()  # ends the idle main thread's wait (_main_wait)
        self._fetcher_done = threading.Event()
        self._ready = threading.Event()  # the store answered its last health check and claim
        self._last_health: bool | None = None  # what the log last said (None: nothing yet)
        # After an outage of H or more (someone's lease may have run out meanwhile), no claim
        # until the retried writes surely landed: connect bound + RETRY_MAX (ClaimPause).
        connect_timeout = float(getattr(self.backend, "connect_timeout", 0.0))
        self._pause = ClaimPause(
            recovery_grace(connect_timeout), settings.effective_heartbeat_interval
        )
        self._claim_sent = 0.0  # monotonic: when the claim in progress started
        self._pruner: Keeper | None = None  # retention (finished_job_retention): SQL only
        self._fold = AckFold(enabled=isinstance(self.backend, SqlQueue))
        self._init_prefetch(settings.prefetch if isinstance(self.backend, SqlQueue) else 0)
        # Job threads, kept for the next job; one whose job ended starts the next held one.
        self._slots = Slots(self._job_thread, take_next=self._take_next_held)
        self._paused: pauses.WorkerPauses | None = None  # the dashboard's pauses (SQL only)
        if isinstance(self.backend, SqlQueue):
            self._paused = pauses.worker_filter(self.backend, self.queues)
            self.backend.claim_gate = self._may_claim_now  # asked just before the claim's write
            self._pruner = retention.pruner(
                self.backend, settings, self.worker_id, when=self._ready.is_set, stop=self._stopping
            )
        self._store_ok_at = time.monotonic()  # the last health check or claim that worked
        self._write_trouble = ""  # the last failed write's reason, while writes are retried
        self._retrying = 0  # writes being retried now (under _running_lock)
        self._lease_ttl = float(
            getattr(self.backend, "lease_ttl", settings.effective_visibility_timeout)
        )
        self._lease_delays = backoff()
        self._upkeep = Keeper(
            [
                Duty("heartbeat", HEARTBEAT_EVERY, self._heartbeat),
                Duty("health", HEALTH_EVERY, self._report_health),
            ],
            log=log,
            name="workerkit-upkeep",
            stop_event=self._stopping,  # no heartbeat once it stops fetching, as before
            max_wait=min(settings.poll_interval, 1.0),
        )
        lease_every = settings.effective_heartbeat_interval
        self._lease_keeper = Keeper(
            [Duty("leases", lease_every, self._extend_leases, first=lease_every)],
            log=log,
            name="workerkit-leases",
            stop_event=self._release_requested,
            max_wait=lease_every,
        )

    # --- control ------------------------------------------------------------------------

    def stop_fetching(self) -> None:
        """Claim nothing more; the jobs in hand may finish."""
        if not self._stopping.is_set():
            self._stopping.set()
            self._slot_freed.set()
        self._main_wake.wake()

    def request_release(self) -> None:
        """Release every unfinished job to its queue and exit (the supervisor's deadline)."""
        self.stop_fetching()
        self._release_requested.set()
        self._main_wake.wake()

    def _on_command(self, command: Command, message: dict[str, Any]) -> None:
        if command == "request_stop":
            self.stop_fetching()
            self._jobs_stop_requested.set()
            with self._running_lock:
                contexts = [running.context for running in self._running.values()]
            for context in contexts:
                context.request_stop()
            log.info("stop requested for running jobs", extra={"event": "jobs_stop_requested"})
        elif command == "release":
            self.request_release()

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        # Only set flags here: a signal handler runs between two bytecodes of whatever the main
        # thread was doing, so it must not take locks the interrupted code may hold (a
        # WakePipe takes none).
        self._stopping.set()
        self._main_wake.wake()

    def _send(self, event: Event) -> None:
        """An event sent alone (not a job's): after the job events gathered before it, or the
        supervisor would see, e.g., a job start after this worker said it stopped fetching."""
        if isinstance(self._job_events, BatchingSender):
            self._job_events.flush()  # nothing gathered: no write
        self.events.send(event)

    @property
    def running_count(self) -> int:
        with self._running_lock:
            return len(self._running)

    # --- the main thread ----------------------------------------------------------------

    def run(self, *, install_signal_handlers: bool = True) -> int:
        """Work until stopped; return the process exit code (0: drained or released)."""
        if install_signal_handlers:
            signal.signal(signal.SIGTERM, self._on_sigterm)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.events.on_command(self._on_command)
        try:
            return self._run()
        finally:
            if isinstance(self._job_events, BatchingSender):
                self._job_events.flush()  # the last jobs' events, before the process exits

    def _run(self) -> int:
        self._upkeep.start()
        threading.Thread(target=self._fetch_loop, name="workerkit-fetcher", daemon=True).start()
        self._lease_keeper.start()
        if self._pruner is not None:
            self._pruner.start()
        announced_stop = False
        while True:
            if self._release_requested.is_set():
                released = self._release_all()
                log.info(
                    "released unfinished jobs",
                    extra={"event": "worker_released", "released": released},
                )
                return 0
            if self._stopping.is_set():
                if not announced_stop:
                    announced_stop = True
                    self._slot_freed.set()
                    self._put_back_prefetched("stopping")  # and the fetcher's, as it ends
                    running = self.running_count
                    self._send(WorkerStopping(running))
                    log.info(
                        "stopped fetching", extra={"event": "worker_stopping", "running": running}
                    )
                if self.running_count == 0 and self._fetcher_idle():
                    # A claim in progress at the stop held its extra jobs after the put-back
                    # above; the fetcher's own may not run before this process exits.
                    self._put_back_prefetched("stopping")
                    log.info("drained", extra={"event": "worker_drained"})
                    return 0
            self._enforce_timeouts()
            self._main_wait()

    def _main_wait(self) -> None:
        """A TICK while jobs run or the worker stops (their timeouts, the drain); once idle for
        IDLE_AFTER, up to IDLE_WAIT, ended at once by a wake of ``_main_wake``."""
        now = time.monotonic()
        if self._running or self._stopping.is_set():
            self._busy_at = now
        if now - self._busy_at < IDLE_AFTER:
            time.sleep(TICK)
            return
        self._main_idle = True
        try:
            # A job begun since the look above saw _main_idle false and did not wake us; it is
            # in _running by now (it is added before its thread looks at the flag).
            if self._running or self._stopping.is_set():
                return
            self._main_wake.wait(IDLE_WAIT)
        finally:
            self._main_idle = False

    def _fetcher_idle(self) -> bool:
        # A claim in progress may hand us jobs; wait for it to finish (it is short) so that no
        # delivery is claimed and then forgotten at exit.
        if self._fetcher_done.is_set():
            return True
        if self._claim_lock.acquire(timeout=TICK):
            self._claim_lock.release()
            return self.running_count == 0
        return False

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        with self._running_lock:
            overdue = [r for r in self._running.values() if r.deadline <= now]
        for running in overdue:
            error = f"JobTimedOut: exceeded its timeout of {running.deadline - running.started:g}s"

            def give_up(r: Running, error: str = error) -> Outcome:
                self._retry_or_fail(r, error)
                return "timed_out"

            self._take_back(running, give_up, JobTimedOut)

    def _release_all(self) -> int:
        with self._claim_lock, self._running_lock:
            everything = list(self._running.values())
        self._put_back_prefetched("released")  # not started: back at once, attempt given back
        # The subprocesses go first: a released job is claimable at once, and one it started must
        # not run beside its next attempt. Jobs are threads here, so which job started which
        # process is unknown: all are stopped. Meanwhile each job's settle is held, so that one
        # seeing its subprocess die cannot write that down as its own failure.
        held = [r for r in everything if r.lock.acquire(timeout=_RELEASE_WAIT)]
        if self._stop_children is not None:
            try:
                self._stop_children()
            except Exception:
                log.exception(
                    "stopping the jobs' subprocesses failed",
                    extra={"event": "stop_children_failed"},
                )
        # _settle logs its own store errors: nothing here gives up or skips. A job whose settle
        # was not held is settling itself (it already had its wait).
        return release_each(
            everything,
            lambda r: self._take_back(r, self._release, JobInterrupted, held=r in held),
            log=log,
        ).released

    def _take_back(
        self,
        running: Running,
        write: Callable[[Running], Outcome],
        interrupt: type[BaseException],
        wait: float = 0.0,
        *,
        held: bool = False,
    ) -> bool:
        """Settle a running job from the main thread, then interrupt its thread."""
        if not self._settle(running, write, patient=False, wait=wait, held=held):
            return False
        # At its next bytecode, and only while the job's body runs (never in the thread's own
        # settle): a blocking C call returns first, so this never *waits*; the delivery is
        # settled already, and the thread's later writes are fenced out.
        running.gate.interrupt(interrupt)
        self._finish(running)
        return True

    # --- the fetcher --------------------------------------------------------------------

    def _fetch_loop(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self._ready.is_set():
                    # The upkeep keeper checks the store again (sooner while it is not ready).
                    self._fold.close()  # job threads write their own acks, retried
                    self._put_back_prefetched("store_not_ready")  # kept if it cannot be
                    self._ready.wait(self._unready_recheck)
                    continue
                grace = self._pause.left()
                if grace > 0:
                    self._fold.close()
                    self._stopping.wait(grace)
                    continue
                self._start_prefetched()  # at once, in the free slots; the claim refills
                free = self._free_slots()
                # Every slot busy and a job held for the next: wait for a slot, or for acks to
                # have waited ACK_WAIT (a held job is claimed for when the buffer is empty).
                if free <= 0 and (self._held or self.prefetch_room <= 0):
                    hold_left = self._tend_held()  # paused queues', held too long: put back
                    self._fold.open()  # about to claim: finished jobs' acks come with it
                    acks = bool(self._fold.pending) and self.prefetch_room > 0
                    wait = min(self.settings.poll_interval, hold_left)
                    freed = self._slot_freed.wait(ACK_WAIT if acks else wait)
                    self._slot_freed.clear()
                    if freed or not acks:
                        continue
                batch = self._fold.take()
                try:
                    claimed = self._claim_and_start(batch)
                finally:  # whatever ends the fetcher, no job thread waits for this batch forever
                    if batch is not None:
                        batch.hand_back()
                if not claimed and self._fold.close_if_empty():
                    poll = self.settings.poll_interval
                    wait = poll if self._paused is None else self._paused.idle_wait(poll)
                    self.backend.wait_for_jobs(self._claim_queues(), wait)
        finally:
            self._fold.close()
            self._put_back_prefetched("stopping")  # what a claim in progress at the stop held
            self._fetcher_done.set()

    def _claim_queues(self) -> list[str]:
        """The queues to claim from: the paused ones left out (read at most once a second)."""
        return list(self.queues) if self._paused is None else self._paused.active()

    # --- upkeep (the keeper's thread) ---------------------------------------------------

    @property
    def _unready_recheck(self) -> float:
        return min(self.settings.poll_interval, HEALTH_EVERY)

    def _heartbeat(self) -> None:
        self._send(Heartbeat(running=self.running_count))

    def _report_health(self) -> float | None:
        """Report the store's health (and queue stats); while not ready, check again sooner."""
        try:
            health = self.backend.health()
            ok, reason = health.ok, health.reason
        except Exception as exc:
            ok, reason = False, f"store check failed: {type(exc).__name__}"
        with self._running_lock:
            retrying = self._retrying or any(r.extend_failures for r in self._running.values())
        if ok and retrying:
            # Reachable for a read, yet a settle or a lease renewal is still failing.
            ok, reason = False, self._write_trouble
        first = ok and not self._ready.is_set()
        now = time.monotonic()
        if first and self._been_ready:
            self._pause.store_back(down_since=self._store_ok_at)  # never shorter than it was
        self._log_health(ok, reason)
        self._send(StoreHealth(ok, reason))
        if first:
            self._send(
                WorkerReady(
                    self.settings.engine, tuple(self.queues), self.concurrency, self.worker_id
                )
            )
        if not ok:
            self._ready.clear()
            return self._unready_recheck
        with contextlib.suppress(Exception):
            stats = self.backend.stats(self.queues)
            self._send(QueueStats(dict(stats.depth), dict(stats.oldest_ready_age)))
        self._store_ok_at = now
        self._been_ready = True
        self._ready.set()  # after the events above, as when one thread did both
        return None

    def _log_health(self, ok: bool, reason: str) -> None:
        # Every change is logged, the first report included: a store that fails from the start
        # must say why, not leave the worker "starting" in silence.
        if ok == self._last_health:
            return
        self._last_health = ok
        grace = self._pause.left() > 0
        log.log(
            logging.INFO if ok else logging.WARNING,
            "store is %s%s",
            "ready" if ok else "not ready",
            f"; claiming again in {self._pause.grace:g} s" if grace else "",
            extra={"event": "store_health", "ok": ok, "reason": reason},
        )

    def _store_failed(self, reason: str) -> None:
        """A claim or a write failed: not ready (no claims) until a health check passes."""
        self._ready.clear()
        self._log_health(False, reason)
        self._send(StoreHealth(ok=False, reason=reason))
        # Checked again at the keeper's next wake (min(poll_interval, 1 s) at most); the fetcher
        # waits for it, as it waited min(poll_interval, HEALTH_EVERY) before.
        self._upkeep.run_soon("health")

    def _may_claim_now(self) -> bool:
        # In the claim, with its connection or SQLite's write lock, just before its write: an
        # outage may have begun or ended since the fetcher looked (or during the claim's wait).
        return self._pause.allows(self._claim_sent) and self._ready.is_set()

    def _claim_and_start(self, batch: Batch | None = None) -> bool:
        with self._claim_lock:
            if self._stopping.is_set():
                if batch is not None:
                    batch.hand_back()
                return True
            # Counted under the lock (a job thread may have just started a held job); the slots
            # of the jobs whose acks this claim writes free up with it.
            free = max(0, self.concurrency - self.running_count + len(batch.acks if batch else ()))
            queues = self._claim_queues()  # none left (all paused): acks only, then idle
            sent = self._claim_sent = time.monotonic()  # the lease starts no earlier
            limit = free + self.prefetch_room  # the jobs beyond the free slots are held
            try:
                if batch is None:
                    deliveries = self.backend.claim(queues, self.worker_id, limit)
                else:
                    assert isinstance(self.backend, SqlQueue)  # only it folds
                    matched, deliveries = self.backend.ack_and_claim(
                        batch.acks, queues, self.worker_id, limit
                    )
                    batch.settled(matched)
            except Exception as exc:
                if batch is not None:
                    batch.hand_back()  # each job thread writes (and retries) its own ack
                if isinstance(exc, (SchemaOutOfDate, StoreError)):
                    self._store_failed(str(exc))
                    return False
                reason = f"claim failed: {type(exc).__name__}"  # a driver error
                log.warning(reason, extra={"event": "claim_failed", "error": str(exc)})
                self._store_failed(reason)
                return False
            if (queues and limit > 0) or (batch is not None and batch.acks):
                self._store_ok_at = time.monotonic()  # a round ran: the store answered
            for delivery in deliveries[free:]:
                self._hold(delivery, sent)
            if deliveries[free:] and not deliveries[:free]:
                self._flush_held()  # else the starts' write carries them
            self._launch(
                [self._begin(delivery, sent, gathered=True) for delivery in deliveries[:free]]
            )
            return bool(deliveries)

    def _free_slots(self) -> int:
        # The slots of the jobs whose acks wait for the next claim free up with it.
        return self.concurrency - self.running_count + self._fold.pending

    def _launch(self, begun: list[Running]) -> None:
        """Start jobs begun with ``gathered`` in job threads, once the supervisor knows of them
        (and of the jobs held with them) in one write: a job started may kill the process."""
        if not begun:
            return
        self._flush_held()
        for running in begun:
            self._slots.start(running, f"job-{running.delivery.job_id}")

    def _begin(self, delivery: Delivery, sent: float, *, gathered: bool = False) -> Running:
        """A job about to run in a job thread: known as running, and announced (``gathered``:
        its event written by the caller's :meth:`_launch`)."""
        task = self.app.tasks.get(delivery.task)
        timeout = (task.timeout if task and task.timeout else None) or self.settings.job_timeout
        context = JobContext(
            job_id=delivery.job_id,
            task=delivery.task,
            queue=delivery.queue,
            attempt=delivery.attempt,
            checkpoint=delivery.checkpoint,
            deadline=time.time() + timeout,
            checkpoint_interval=self.settings.checkpoint_interval,
            save=retrying_sink(
                JobContext.delivery_sink(self.backend, delivery),
                lambda: self._retrying_write(box[0], "checkpoint", within_lease=True),
            ),
            on_checkpoint_saved=self._checkpoint_saved,
        )
        if self._jobs_stop_requested.is_set():
            context.request_stop()
        now = time.monotonic()
        running = Running(delivery, context, now, now + timeout, lease_from=sent)
        box = [running]
        queued_for = None
        if delivery.enqueued_at is not None:
            queued_for = max(0.0, time.time() - delivery.enqueued_at)
        started = JobStarted(
            delivery.job_id,
            delivery.task,
            delivery.queue,
            delivery.attempt,
            delivery.ref(),
            queued_for,
        )
        # At once (a kill right after it is known), in one write with the events gathered
        # before it (the previous job's finish, at concurrency 1): one write per job, or per
        # claim's jobs (gathered).
        self._send_job_event(started, now=not gathered)
        log.info(
            "job started",
            extra={
                "event": "job_started",
                "job_id": delivery.job_id,
                "task": delivery.task,
                "attempt": delivery.attempt,
            },
        )
        with self._running_lock:
            self._running[delivery.job_id] = running
        if self._main_idle:  # its timeout is enforced by the main thread, which must look
            self._main_wake.wake()
        return running

    def _checkpoint_saved(self, context: JobContext) -> None:
        self._job_events.send(CheckpointSaved(context.job_id, context.task, context.queue))

    # --- one job ------------------------------------------------------------------------

    def _job_thread(self, running: Running) -> None:
        try:
            self._run_job(running)
        except BaseException as exc:
            # What the job raised that is not the engine's to settle (SystemExit...): the
            # delivery is left to its lease. Logged, never escaping the thread.
            log.warning(
                "job thread ended by an exception left to the lease",
                extra={
                    "event": "job_thread_exception",
                    "job_id": running.delivery.job_id,
                    "error": f"{type(exc).__name__}: {exc}",
                },
            )

    def _run_job(self, running: Running) -> None:
        delivery, context = running.delivery, running.context
        task = self.app.tasks.get(delivery.task)
        folded = False  # its ack went to the fetcher's next claim, which finishes the job
        try:
            if task is None:
                raise PermanentFailure(
                    f"UnknownTask: no task {delivery.task!r} is registered in this worker's app "
                    f"({self.settings.app or 'no --app'}); is it running the code that enqueued it?"
                )
            try:
                args, kwargs = decode_payload(delivery.payload, into=context)
            except PayloadError as exc:
                raise PermanentFailure(f"PayloadError: {exc}") from exc
            check_arguments(task.fn, args, kwargs)
            with context.activate(), running.gate:
                result = task.fn(*args, **kwargs)
            try:
                json.dumps(result, allow_nan=False)
            except (TypeError, ValueError, RecursionError) as exc:
                raise PermanentFailure(f"ResultError: result is not JSON: {exc}") from exc
            folded = self._offer_ack(running, result)
            if not folded:
                self._settle(running, lambda r: self._ack(r, result))
        except BaseException as exc:
            # docs/concepts/attempts.md has the table; this maps each verdict to a store write.
            def backoff() -> float:
                return task.retry_delay(1) if task else self.settings.poll_interval

            verdict = verdict_for(exc, RULES, backoff=backoff, lease_lost=context.lease_lost)
            match verdict:
                case Release():
                    self._settle(running, self._release)
                case StandDown(outcome=outcome):
                    # After a release or timeout the main thread settled first: nothing happens.
                    self._settle(running, lambda r: outcome)
                case Defer(delay=delay, reason=reason):
                    self._settle(running, lambda r: self._defer(r, delay, reason))
                case Fail(reason=reason):
                    self._settle(running, lambda r: self._fail(r, reason))
                case RetryOrFail():
                    error = verdict.error
                    self._settle(running, lambda r: self._retry_or_fail(r, error))
                case Propagate() | Retried():
                    raise
        finally:
            if not folded:
                self._finish(running)

    def _finish(self, running: Running) -> None:
        with self._running_lock:
            # Only this attempt: the job may be running again here (a retry, or a claim after
            # its lease ran out) while this thread ended late.
            if self._running.get(running.delivery.job_id) is not running:
                return
            del self._running[running.delivery.job_id]
        outcome = running.settled_as or "lease_lost"
        delivery = running.delivery
        duration = time.monotonic() - running.started
        self._job_events.send(
            JobFinished(delivery.job_id, delivery.task, delivery.queue, outcome, duration)
        )
        log.info(
            "job finished",
            extra={
                "event": "job_finished",
                "job_id": delivery.job_id,
                "task": delivery.task,
                "outcome": outcome,
                "duration": round(duration, 3),
            },
        )
        self._slot_freed.set()
