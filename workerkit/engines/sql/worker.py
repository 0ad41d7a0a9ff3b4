"""The sql engine's worker loop: claims an App's jobs from a queue backend and runs them.

The process the supervisor starts for the ``sql`` engine (``python -m workerkit.engines.sql``),
and what :func:`workerkit.testing.run_jobs` runs in-process. The main thread keeps the signals
and never blocks; a fetcher thread claims, two keepers do the upkeep (leases; heartbeat and
health), each job has a thread.
Every delivery is settled once, under its own lock, by whoever comes first (its job thread, or
the main thread at a release or timeout). docs/engines/sql.md ("The worker") has the why.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
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
    Rules,
    StandDown,
    release_each,
    verdict_for,
)
from workerkit.engines.lifeline import Lifeline, stop_children
from workerkit.errors import JobInterrupted, LeaseLost, PayloadError, SchemaOutOfDate, StoreError
from workerkit.events import (
    CheckpointSaved,
    Heartbeat,
    JobFinished,
    JobHeartbeat,
    JobStarted,
    Outcome,
    QueueStats,
    StoreHealth,
    WorkerReady,
    WorkerStopping,
)
from workerkit.idempotency import outcome_of
from workerkit.job import JobContext
from workerkit.proctree import STOP_GRACE

if TYPE_CHECKING:
    from workerkit.engines.base import Delivery, QueueBackend
    from workerkit.events import Command, EventClient
    from workerkit.settings import Settings

__all__ = ("NativeWorker", "main")

log = logging.getLogger(__name__)

TICK = 0.05  # how often the main thread looks at its flags


class JobTimedOut(BaseException):
    """Raised inside a job's thread when it passes its timeout."""


class _PermanentFailure(Exception):
    """A job that cannot succeed on any attempt (unknown task, bad payload, non-JSON result)."""


# The main thread settles a delivery before it interrupts the job's thread (release, timeout);
# a BaseException the job raised itself (SystemExit...) is left to the delivery's lease.
_RULES = Rules(
    interrupts=(JobInterrupted, JobTimedOut),
    permanent=(_PermanentFailure,),
    settle_base_exceptions=False,
)


def interrupt_thread(thread: threading.Thread, exc_type: type[BaseException]) -> bool:
    """Raise ``exc_type`` in ``thread`` at its next Python bytecode.

    This cannot interrupt a blocking C call (a long ``time.sleep``, a socket read): the exception
    lands when the call returns. That is why release and timeout never *wait* for it: the
    delivery is settled in the store first, and the thread's later writes are fenced out.
    """
    ident = thread.ident
    if ident is None or not thread.is_alive():
        return False
    changed = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(ident), ctypes.py_object(exc_type)
    )
    return bool(changed == 1)


@dataclass(eq=False)
class _Running:
    delivery: Delivery
    context: JobContext
    started: float  # monotonic
    deadline: float  # monotonic
    thread: threading.Thread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    settled_as: Outcome | None = None


class NativeWorker:
    """Claims and runs jobs of an :class:`~workerkit.app.App` with bounded concurrency."""

    def __init__(
        self,
        app: App,
        settings: Settings,
        *,
        backend: QueueBackend | None = None,
        events: EventClient | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.backend = backend if backend is not None else app.backend
        self.events = events if events is not None else events_module.EventClient(None, role="")
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.queues = settings.queue_names
        self.concurrency = settings.concurrency
        self._running: dict[str, _Running] = {}
        self._running_lock = threading.Lock()
        self._claim_lock = threading.Lock()  # held while a claim is in progress
        self._slot_freed = threading.Event()
        self._stopping = threading.Event()
        self._release_requested = threading.Event()
        self._jobs_stop_requested = threading.Event()
        self._fetcher_done = threading.Event()
        self._ready = threading.Event()  # the store answered its last health check and claim
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

    def request_release(self) -> None:
        """Release every unfinished job to its queue and exit (the supervisor's deadline)."""
        self.stop_fetching()
        self._release_requested.set()

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
        # thread was doing, so it must not take locks the interrupted code may hold.
        self._stopping.set()

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
        self._upkeep.start()
        threading.Thread(target=self._fetch_loop, name="workerkit-fetcher", daemon=True).start()
        self._lease_keeper.start()
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
                    running = self.running_count
                    self.events.send(WorkerStopping(running))
                    log.info(
                        "stopped fetching", extra={"event": "worker_stopping", "running": running}
                    )
                if self.running_count == 0 and self._fetcher_idle():
                    log.info("drained", extra={"event": "worker_drained"})
                    return 0
            self._enforce_timeouts()
            time.sleep(TICK)

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

            def give_up(r: _Running, error: str = error) -> Outcome:
                self._retry_or_fail(r, error)
                return "timed_out"

            self._take_back(running, give_up, JobTimedOut)

    def _release_all(self) -> int:
        with self._claim_lock, self._running_lock:
            everything = list(self._running.values())
        # _settle logs its own store errors: nothing here gives up or skips.
        return release_each(
            everything, lambda r: self._take_back(r, self._release, JobInterrupted), log=log
        ).released

    def _take_back(
        self,
        running: _Running,
        write: Callable[[_Running], Outcome],
        interrupt: type[BaseException],
    ) -> bool:
        """Settle a running job from the main thread, then interrupt its thread."""
        if not self._settle(running, write):
            return False
        if running.thread is not None:
            interrupt_thread(running.thread, interrupt)
        self._finish(running)
        return True

    # --- the fetcher --------------------------------------------------------------------

    def _fetch_loop(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self._ready.is_set():
                    # The upkeep keeper checks the store again (sooner while it is not ready).
                    self._ready.wait(self._unready_recheck)
                    continue
                free = self.concurrency - self.running_count
                if free <= 0:
                    self._slot_freed.wait(self.settings.poll_interval)
                    self._slot_freed.clear()
                    continue
                if not self._claim_and_start(free):
                    self.backend.wait_for_jobs(self.queues, self.settings.poll_interval)
        finally:
            self._fetcher_done.set()

    # --- upkeep (the keeper's thread) ---------------------------------------------------

    @property
    def _unready_recheck(self) -> float:
        return min(self.settings.poll_interval, HEALTH_EVERY)

    def _heartbeat(self) -> None:
        self.events.send(Heartbeat(running=self.running_count))

    def _report_health(self) -> float | None:
        """Report the store's health (and queue stats); while not ready, check again sooner."""
        try:
            health = self.backend.health()
            ok, reason = health.ok, health.reason
        except Exception as exc:
            ok, reason = False, f"store check failed: {type(exc).__name__}"
        first = ok and not self._ready.is_set()
        if ok != self._ready.is_set():
            log.log(
                logging.INFO if ok else logging.WARNING,
                "store is %s",
                "ready" if ok else "not ready",
                extra={"event": "store_health", "ok": ok, "reason": reason},
            )
        self.events.send(StoreHealth(ok, reason))
        if first:
            self.events.send(
                WorkerReady(self.settings.engine, tuple(self.queues), self.concurrency)
            )
        if not ok:
            self._ready.clear()
            return self._unready_recheck
        with contextlib.suppress(Exception):
            stats = self.backend.stats(self.queues)
            self.events.send(QueueStats(dict(stats.depth), dict(stats.oldest_ready_age)))
        self._ready.set()  # after the events above, as when one thread did both
        return None

    def _claim_and_start(self, free: int) -> bool:
        with self._claim_lock:
            if self._stopping.is_set():
                return True
            try:
                deliveries = self.backend.claim(self.queues, self.worker_id, free)
            except (SchemaOutOfDate, StoreError) as exc:
                self._claim_failed(str(exc))
                return False
            except Exception as exc:  # a driver error: the store is unusable for now
                reason = f"claim failed: {type(exc).__name__}"
                log.warning(reason, extra={"event": "claim_failed", "error": str(exc)})
                self._claim_failed(reason)
                return False
            for delivery in deliveries:
                self._start(delivery)
            return bool(deliveries)

    def _claim_failed(self, reason: str) -> None:
        self._ready.clear()
        self.events.send(StoreHealth(ok=False, reason=reason))
        # Checked again at the keeper's next wake (min(poll_interval, 1 s) at most); the fetcher
        # waits for it, as it waited min(poll_interval, HEALTH_EVERY) before.
        self._upkeep.run_soon("health")

    def _start(self, delivery: Delivery) -> None:
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
            save=JobContext.delivery_sink(self.backend, delivery),
            on_checkpoint_saved=self._checkpoint_saved,
        )
        if self._jobs_stop_requested.is_set():
            context.request_stop()
        now = time.monotonic()
        running = _Running(delivery, context, started=now, deadline=now + timeout)
        queued_for = None
        if delivery.enqueued_at is not None:
            queued_for = max(0.0, time.time() - delivery.enqueued_at)
        self.events.send(
            JobStarted(
                delivery.job_id,
                delivery.task,
                delivery.queue,
                delivery.attempt,
                delivery.ref(),
                queued_for,
            )
        )
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
        thread = threading.Thread(
            target=self._run_job, args=(running,), name=f"job-{delivery.job_id}", daemon=True
        )
        running.thread = thread
        thread.start()

    def _checkpoint_saved(self, context: JobContext) -> None:
        self.events.send(CheckpointSaved(context.job_id, context.task, context.queue))

    # --- the lease keeper's duty (every H, until a release) ------------------------------

    def _extend_leases(self) -> None:
        with self._running_lock:
            running = list(self._running.values())
        for item in running:
            try:
                kept = self.backend.extend(item.delivery)
            except Exception as exc:
                # The store is unreachable; the lease may still hold. Try again next time.
                log.warning(
                    "lease extension failed",
                    extra={
                        "event": "lease_extend_failed",
                        "job_id": item.delivery.job_id,
                        "error": str(exc),
                    },
                )
                continue
            if kept:
                self.events.send(JobHeartbeat(item.delivery.job_id))
            else:
                item.context.mark_lease_lost()
                log.warning(
                    "lease lost: another worker owns the job now",
                    extra={"event": "lease_lost", "job_id": item.delivery.job_id},
                )

    # --- one job ------------------------------------------------------------------------

    def _run_job(self, running: _Running) -> None:
        delivery, context = running.delivery, running.context
        task = self.app.tasks.get(delivery.task)
        try:
            if task is None:
                raise _PermanentFailure(
                    f"UnknownTask: no task {delivery.task!r} is registered in this worker's app "
                    f"({self.settings.app or 'no --app'}); is it running the code that enqueued it?"
                )
            try:
                args, kwargs = decode_payload(delivery.payload)
            except PayloadError as exc:
                raise _PermanentFailure(f"PayloadError: {exc}") from exc
            with context.activate():
                result = task.fn(*args, **kwargs)
            try:
                json.dumps(result, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise _PermanentFailure(f"ResultError: result is not JSON: {exc}") from exc
            self._settle(running, lambda r: self._ack(r, result))
        except BaseException as exc:
            # docs/concepts/attempts.md has the table; this maps each verdict to a store write.
            def backoff() -> float:
                return task.retry_delay(1) if task else self.settings.poll_interval

            verdict = verdict_for(exc, _RULES, backoff=backoff, lease_lost=context.lease_lost)
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
            self._finish(running)

    # Each settling write returns the outcome it stands for.

    def _ack(self, running: _Running, result: Any) -> Outcome:
        self.backend.ack(running.delivery, result)
        replayed = outcome_of(running.context) == "replayed"
        return "skipped_duplicate" if replayed else "succeeded"

    def _defer(self, running: _Running, delay: float, reason: str) -> Outcome:
        self.backend.defer(running.delivery, time.time() + max(0.0, delay), reason)
        return "deferred"

    def _fail(self, running: _Running, error: str) -> Outcome:
        self.backend.fail(running.delivery, error)
        return "failed"

    def _retry_or_fail(self, running: _Running, error: str) -> Outcome:
        delivery = running.delivery
        task = self.app.tasks.get(delivery.task)
        if task is None or delivery.attempt >= delivery.max_attempts:
            return self._fail(running, error)
        self.backend.retry(delivery, error, time.time() + task.retry_delay(delivery.attempt))
        return "retried"

    def _release(self, running: _Running) -> Outcome:
        with contextlib.suppress(Exception):
            running.context.flush()  # a checkpoint kept for later is saved before the release
        self.backend.release(running.delivery)
        return "released"

    def _settle(self, running: _Running, write: Callable[[_Running], Outcome]) -> bool:
        """Settle the delivery once, recording the outcome; False when it already was."""
        with running.lock:
            if running.settled_as is not None:
                return False
            try:
                running.settled_as = write(running)
            except LeaseLost:
                running.settled_as = "lease_lost"
            except Exception as exc:
                # The store failed; the lease will expire and the job will be claimed again.
                log.warning(
                    "could not settle job",
                    extra={
                        "event": "settle_failed",
                        "job_id": running.delivery.job_id,
                        "error": str(exc),
                    },
                )
                running.settled_as = "lease_lost"
            return True

    def _finish(self, running: _Running) -> None:
        with self._running_lock:
            if self._running.pop(running.delivery.job_id, None) is None:
                return
        outcome = running.settled_as or "lease_lost"
        delivery = running.delivery
        duration = time.monotonic() - running.started
        self.events.send(
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


def main() -> None:
    """``python -m workerkit.engines.sql``: the sql engine's worker, started by the supervisor."""
    from workerkit.loading import import_app
    from workerkit.logs import configure_logging
    from workerkit.settings import load_settings

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    if not settings.app:
        log.error(
            "the sql worker needs an app: give --app MODULE:APP or WORKERKIT_APP",
            extra={"event": "worker_config_error"},
        )
        sys.exit(2)
    app = import_app(settings.app)
    if not isinstance(app, App):
        log.error(
            "--app %s is not a workerkit.App", settings.app, extra={"event": "worker_config_error"}
        )
        sys.exit(2)
    app.configure_settings(settings)
    events = events_module.client("worker")
    worker = NativeWorker(app, settings, events=events)
    # The supervisor's death (or SIGQUIT) is the supervisor's release command, at once.
    Lifeline(worker.request_release).start()
    code = worker.run()
    # Jobs run in threads of this process, so a subprocess cannot be told apart by the job
    # that started it: every one still running is stopped now, as the worker ends.
    stop_children(STOP_GRACE)
    logging.shutdown()
    # Job threads of released or timed-out jobs may still be blocked in C code; their work is
    # settled and fenced, so do not wait for them.
    os._exit(code)
