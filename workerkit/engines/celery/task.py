"""The per-task path inside a Celery worker: the job context, running a task, the Request.

Kept lean on purpose (it runs for every message): the attempt and the checkpoint's fencing
generation come from the message headers, and the checkpoint is read from Redis only when the
task touches it, so a task that never does costs no Redis round trip of workerkit's own.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from workerkit.engines.attempt import (
    Defer,
    Release,
    Retried,
    RetryOrFail,
    Rules,
    StandDown,
    check_arguments,
    verdict_for,
)
from workerkit.engines.celery.config import limited_by_workerkit, soft_limit_for, user_tasks
from workerkit.engines.celery.lease import LEASE_LOST_REASON
from workerkit.engines.celery.ledger import CRASHES_HEADER, GEN_HEADER, Generation, count
from workerkit.engines.celery.outage import broker_errors, retry_in_background, retrying
from workerkit.errors import StoreUnavailable
from workerkit.events import CheckpointSaved, JobFinished, JobOutcome, JobStarted
from workerkit.idempotency import idempotency_of, outcome_of
from workerkit.job import JobContext

if TYPE_CHECKING:
    from workerkit.engines.celery.runtime import Runtime
    from workerkit.events import BatchingSender

__all__ = (
    "DEFAULT_MAX_ATTEMPTS",
    "FIRE_TIME_HEADER",
    "RELEASE_REASON",
    "SCHEDULE_HEADER",
    "AttemptsExhausted",
    "CeleryJobContext",
    "QuietRelease",
    "WorkerkitRequestMixin",
    "delivery_tag",
    "fire_of",
    "request_class",
    "run_job",
    "wrap_tasks",
)

log = logging.getLogger("workerkit.engines.celery")

#: Runs whose worker died after which a message is failed instead of run again (a poison
#: message that kills its worker every time). Per task: ``@app.task(workerkit_max_attempts=5)``.
DEFAULT_MAX_ATTEMPTS: Final = 3

#: The message headers of a scheduler's fire (engines/celery/scheduling.py): its schedule and
#: fire time, put into ``current_job()`` (Celery makes custom headers ``task.request`` attributes).
SCHEDULE_HEADER: Final = "workerkit_schedule"
FIRE_TIME_HEADER: Final = "workerkit_fire_time"

#: The reason of the Reject a job's release becomes: how :class:`QuietRelease` knows it.
RELEASE_REASON: Final = "released by the job (workerkit)"

#: How long a settle the broker cannot take is retried in the consumer's loop (a killed
#: connection reconnects at the next try) before a thread retries it (outage.py).
SETTLE_INLINE: Final = 0.3


def delivery_tag(request: Any) -> str | None:
    info = getattr(request, "delivery_info", None) or {}
    tag = info.get("delivery_tag")
    if tag is None:
        tag = (getattr(request, "properties", None) or {}).get("delivery_tag")
    return str(tag) if tag is not None else None


class AttemptsExhausted(Exception):
    """The task's worker died ``workerkit_max_attempts`` times while running it: failed."""


class CeleryJobContext(JobContext):
    """A job context whose checkpoint is read (and fence taken) on first use, not at start.

    Most tasks never touch a checkpoint: they cost no Redis round trip of workerkit's own.
    """

    def __init__(
        self,
        runtime: Runtime,
        task: Any,
        events: BatchingSender,
        job_id: str,
        queue: str,
        attempt: int,
        generation: Generation,
        started_at: float,
    ) -> None:
        self._runtime = runtime
        self._events = events
        self._generation = generation
        # Set once this attempt read or wrote the checkpoint keys (its fence is taken).
        self._claimed = False
        #: Set once a checkpoint could not be saved within the lease: the run is released.
        self.store_failed = False
        settings = runtime.settings
        super().__init__(
            job_id=job_id,
            task=task.name,
            queue=queue,
            attempt=attempt,
            deadline=started_at + _hard_limit(task, settings.job_timeout),
            checkpoint_interval=settings.checkpoint_interval,
            save=self._save_fenced,
            on_checkpoint_saved=self._report_saved,
        )

    def _report_saved(self, ctx: JobContext) -> None:
        self._events.send(CheckpointSaved(ctx.job_id, ctx.task, ctx.queue))

    @property
    def checkpoint(self) -> Any:
        if not self._claimed:
            self._claim()
        return super().checkpoint

    def _claim(self) -> None:
        with self._lock:
            if self._claimed:
                return
            try:
                fresh, stored = self._runtime.ledger.claim_checkpoint(self.job_id, self._generation)
            except Exception as exc:  # Redis is briefly unreachable: resume from nothing
                log.warning(
                    "cannot read the checkpoint",
                    extra={"event": "checkpoint_read_failed", "error": str(exc)},
                )
                return
            self._claimed = True
            self._checkpoint = stored
            if not fresh:  # a newer attempt of this task touched the checkpoint
                self._lease_lost = True
                self._stop.set()

    def _save_fenced(self, state: Any) -> None:
        # Called by flush() with self._lock held. A broker error is retried while the lease
        # surely holds (outage.py); past it the task is stopped and released (run_job), never
        # failed: its message stays in unacked and goes back with its last saved checkpoint.
        if self.store_failed:
            raise StoreUnavailable(f"task {self.job_id}: the broker is unreachable")
        started = time.monotonic()
        lease = self._runtime.lease
        ttl = lease.ttl

        def keep_trying() -> bool:
            left = lease.left()
            if left is None:  # before the worker's first renewal: half a lease from here
                return time.monotonic() - started < ttl / 2 and not self._lease_lost
            return left > lease.stop_at and not self._lease_lost

        try:
            retrying(
                "checkpoint",
                self.job_id,
                lambda: self._runtime.ledger.save_checkpoint(self.job_id, self._generation, state),
                keep_trying=keep_trying,
            )
        except broker_errors() as exc:
            self.store_failed = True
            self._stop.set()
            log.warning(
                "checkpoint not saved: the broker stayed unreachable for the lease; stopping "
                "the task, it goes back to its queue with its last saved checkpoint",
                extra={"event": "checkpoint_save_failed", "job_id": self.job_id, "error": str(exc)},
            )
            raise StoreUnavailable(
                f"task {self.job_id}: checkpoint not saved, the broker is unreachable: {exc}"
            ) from exc
        self._claimed = True

    def finish(self, checkpointed: bool) -> None:
        """On success: delete the checkpoint and fence, when this task may have any."""
        if not (self._claimed or checkpointed):
            return
        try:
            self._runtime.ledger.finish(self.job_id, self._generation)
        except Exception as exc:  # the keys expire anyway (KEY_RETENTION)
            log.warning(
                "cannot delete the checkpoint",
                extra={
                    "event": "checkpoint_delete_failed",
                    "job_id": self.job_id,
                    "error": str(exc),
                },
            )


def _hard_limit(task: Any, default: float) -> float:
    """The run's hard time limit: the message's own (``apply_async(time_limit=...)``) first."""
    limits = getattr(task.request, "timelimit", None) or (None, None)
    return float(limits[0] or task.time_limit or default)


@functools.cache
def _celery_rules() -> tuple[Any, Rules]:
    """Celery's Reject and its rows of the verdict table, built once (in the except branch only).

    Celery settles a task itself: workerkit labels the outcome, and turns a release into a
    Reject and a busy idempotency key into a Celery retry of ``max(1, min(retry_after or 5,
    60))`` seconds (it counts against the task's max_retries). A Fail (a reused key) is raised
    as it is, so Celery's retry options still apply to it; no interrupts (a JobInterrupted is
    "failed"); no flags (no stale-attempt check). As before the table.
    """
    # Imported here: the package is imported by the supervisor, which may not have Celery.
    from celery.exceptions import Reject, Retry, SoftTimeLimitExceeded

    rules = Rules(
        interrupts=(),
        retries=(Retry,),
        timeouts=(SoftTimeLimitExceeded,),
        defer_cap=60.0,
        defer_floor=1.0,
        zero_retry_after_is_unknown=True,
    )
    return Reject, rules


def _five_seconds() -> float:
    return 5.0


def fire_of(request: Any) -> tuple[str | None, float | None]:
    """The schedule and fire time of a scheduler's message (its headers), or ``(None, None)``."""
    schedule = getattr(request, SCHEDULE_HEADER, None)
    fire_time = getattr(request, FIRE_TIME_HEADER, None)
    if isinstance(schedule, str) and isinstance(fire_time, (int, float)):
        return schedule, float(fire_time)
    return None, None


def run_job(runtime: Runtime, task: Any, run: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """Run one task with a job context; report its start and finish; map its outcome."""
    request = task.request
    job_id = str(request.id)
    queue = str((request.delivery_info or {}).get("routing_key") or "")
    # The attempt and the fencing generation come from the message (see GEN_HEADER): no
    # Redis round trip at start.
    retries = count(request.retries)
    crashes = count(getattr(request, CRASHES_HEADER, 0))
    attempt = 1 + retries + crashes
    started_at = time.time()
    generation = (retries, count(getattr(request, GEN_HEADER, 0)), int(started_at * 1000))
    events = runtime.task_events
    if events is None:
        events = runtime.open_task_events()
    context = CeleryJobContext(
        runtime, task, events, job_id, queue, attempt, generation, started_at
    )
    context.schedule, context.fire_time = fire_of(request)
    if runtime.stop_requested.is_set():
        context.request_stop()
    _announce_start(runtime, events, task, job_id, queue, attempt)
    started = time.monotonic()
    outcome: JobOutcome = "failed"
    try:
        max_attempts = count(getattr(task, "workerkit_max_attempts", None)) or DEFAULT_MAX_ATTEMPTS
        if crashes >= max_attempts:
            raise _poison(task.name, job_id, crashes, max_attempts)
        check_arguments(run, args, kwargs)
        result = _run_leased(runtime, context, run, args, kwargs)
    except BaseException as exc:
        # Looked up here only: a task that returns pays nothing for the table.
        Reject, rules = _celery_rules()  # noqa: N806
        if context.lease_lost:
            # This run was stopped (the watchdog: the worker could not renew its leases; or a
            # newer attempt took its checkpoint): another worker may run the task now. It is
            # not settled: the main process restores the message only if no other worker
            # holds it (WorkerkitRequestMixin.reject, fenced). A run that failed on its own,
            # never stopped, settles as usual (its settle is fenced by its lease, ack.lua).
            outcome = "lease_lost"
            raise _lease_lost(job_id, task.name) from None
        released = _bookkeeping_failed(exc, context, run, task.name)
        if released is not None:  # our bookkeeping failed, not the task
            outcome = "released"
            raise released from None
        match verdict_for(exc, rules, backoff=_five_seconds):
            case Release():
                outcome = "released"
                log.info(
                    "task released by the job: back to its queue",
                    extra={"event": "job_released", "job_id": job_id, "task": task.name},
                )
                # Reject with requeue: the main process puts the message back in its queue now
                # (see WorkerkitRequestMixin.reject), and acknowledges nothing. The attempt is
                # not counted: only a crash adds to it. Celery's warning for it is dropped
                # (QuietRelease): the line above says it.
                raise Reject(RELEASE_REASON, requeue=True) from None
            case Defer(delay=delay):
                outcome = "retried"  # task.retry() raises Celery's Retry itself
                outcome, deferred = _retry_later(task, job_id, exc, delay)
                raise deferred from None
            case StandDown(outcome=label):
                outcome = label
                raise
            case Retried():
                outcome = "retried"
                raise
            case RetryOrFail(timed_out=True):
                outcome = "timed_out"
                raise
            case _:  # Fail, RetryOrFail: Celery settles it (and may retry it) as it is
                raise
    else:
        outcome = "succeeded"
        context.finish(bool(getattr(task, "workerkit_checkpointed", False)))
        return result
    finally:
        events.send(JobFinished(job_id, task.name, queue, outcome, time.monotonic() - started))


def _announce_start(
    runtime: Runtime, events: Any, task: Any, job_id: str, queue: str, attempt: int
) -> None:
    """Send JobStarted with the delivery the supervisor would release after a kill."""
    if not events.connected:  # nothing to build for a worker run without a supervisor
        return
    delivery = {
        "job_id": job_id,
        "delivery_tag": delivery_tag(task.request),
        "queue": queue,
        "worker": runtime.worker_id,
    }
    events.send(JobStarted(job_id, task.name, queue, attempt, delivery, None))


#: The Rejects of ours that Celery need not log (run_job logged them already).
_QUIET: Final = (RELEASE_REASON, LEASE_LOST_REASON)


class QuietRelease(logging.Filter):
    """Drops ``celery.app.trace``'s record of a job's release (filter that logger with it).

    Celery logs every Reject as a WARNING with the traceback of its ``raise``; a release is the
    normal end of a cooperative job on a deploy, and :func:`run_job` logs it as one INFO
    ``job_released`` line already.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            return getattr(exc, "reason", None) not in _QUIET
        data = getattr(record, "data", None)
        text = str(data.get("exc", "")) if isinstance(data, dict) else ""
        return not any(reason in text for reason in _QUIET)


def _run_leased(
    runtime: Runtime, context: JobContext, run: Callable[..., Any], args: Any, kwargs: Any
) -> Any:
    """Run the task in its context, under the lease watchdog in a prefork pool child.

    A run that returns is settled, even when the shared lease deadline is near or the watchdog
    asked it to stop: the task is done, running it again would be a second run. Its ack is
    fenced by its own lease (ack.lua): it lands while the lease is this worker's or nobody's,
    and is skipped (``settle_fenced``) only when another worker holds the message by now.
    """
    watchdog = runtime.watchdog  # a prefork pool child's (lease.py)
    with context.activate():
        if watchdog is None:
            result = run(*args, **kwargs)
        else:
            watchdog.begin(context)
            try:
                result = run(*args, **kwargs)
            finally:
                watchdog.end(context)
    return result


def _lease_lost(job_id: str, task: str) -> Exception:
    from celery.exceptions import Reject

    log.warning(
        "lease lost: the task is given back unsettled",
        extra={"event": "job_lease_lost", "job_id": job_id, "task": task},
    )
    rejection: Exception = Reject(LEASE_LOST_REASON, requeue=True)
    return rejection


def _released(job_id: str, task: str, reason: str, why: str, error: object = None) -> Exception:
    """Released, never failed: our bookkeeping failed, not the task (Celery would acknowledge
    a failure, and the message would be gone). It goes back to its queue by the fenced
    restore, retried until the broker takes it; the ``reason``s:

    ``broker_unreachable``: a checkpoint the broker could not take within the lease; it goes
    back with its last saved checkpoint. ``idempotency_store_unreachable``: its idempotency
    key could not be claimed (the store, Redis, unreachable through the claim's retries), so
    its body never ran. ``retry_not_published``: Celery could not publish the retry of a
    deferred task (a busy key) and rejects such a message without requeue, an ack.
    """
    from celery.exceptions import Reject

    fields = {"event": "job_released", "reason": reason, "job_id": job_id, "task": task}
    if error is not None:
        fields["error"] = str(error)
    log.warning("task released: %s", why, extra=fields)
    rejection: Exception = Reject(RELEASE_REASON, requeue=True)
    return rejection


def _bookkeeping_failed(
    exc: BaseException, context: CeleryJobContext, run: Callable[..., Any], task: str
) -> Exception | None:
    """The release (:func:`_released`) of a run that ended because workerkit's own store
    failed it: a checkpoint not saved within the lease, or the idempotency key of a task that
    could not be claimed (no claim landed: the body never ran). None: the task's own end."""
    if context.store_failed:
        why = "the broker was unreachable for its checkpoint"
        return _released(context.job_id, task, "broker_unreachable", why)
    if (
        isinstance(exc, StoreUnavailable)
        and outcome_of(context) is None
        and idempotency_of(run) is not None
    ):
        why = "its idempotency key could not be claimed, the store is unreachable"
        return _released(context.job_id, task, "idempotency_store_unreachable", why, exc)
    return None


def _retry_later(
    task: Any, job_id: str, exc: BaseException, delay: float
) -> tuple[JobOutcome, BaseException]:
    """A deferred task's Celery retry (``"retried"``), or its release when Celery could not
    publish the retry (``"released"``, see :func:`_released`)."""
    from kombu.exceptions import OperationalError

    Reject, _ = _celery_rules()  # noqa: N806
    try:
        return "retried", task.retry(exc=exc, countdown=delay)
    except Reject as rejected:
        unpublished = isinstance(rejected.reason, (OperationalError, *broker_errors()))
        if rejected.requeue or not unpublished:
            raise
        why = "its retry could not be published, the broker is unreachable"
        return "released", _released(job_id, task.name, "retry_not_published", why, rejected.reason)


def _poison(task: str, job_id: str, crashes: int, max_attempts: int) -> AttemptsExhausted:
    """A poison message: every run so far killed its worker (an out-of-memory kill, a segfault).

    Celery's max_retries does not see these (a redelivery is not a retry): the task fails now,
    without running, through Celery's own failure path (result backend, task_failure, the ack).
    """
    log.error(
        "task failed: its worker died on every attempt",
        extra={
            "event": "job_attempts_exhausted",
            "job_id": job_id,
            "task": task,
            "crashes": crashes,
            "max_attempts": max_attempts,
        },
    )
    return AttemptsExhausted(
        f"workerkit: the worker died {crashes} times running task {task} "
        f"{job_id} (workerkit_max_attempts={max_attempts})"
    )


def wrap_tasks(app: Any, runtime: Runtime) -> None:
    """Run every user task of ``app`` with a job context (before the worker builds tracers).

    Every task, Celery's own (``celery.*``) included, gets workerkit's Request class: that is
    how the worker knows which messages it holds (see WorkerkitRequestMixin).
    """
    for task in app.tasks.values():
        # Celery's documented hook for custom requests ("Task.Request"); the worker's
        # strategy subclasses it once per task, so the user's own Request class still works.
        task.Request = request_class(task.Request, runtime)
    for task in user_tasks(app):
        if getattr(task, "_workerkit_original_run", None) is not None:
            continue
        original = task.run

        def run(
            *args: Any,
            _runtime: Runtime = runtime,
            _task: Any = task,
            _run: Callable[..., Any] = original,
            **kwargs: Any,
        ) -> Any:
            return run_job(_runtime, _task, _run, args, kwargs)

        functools.update_wrapper(run, original)
        task._workerkit_original_run = original
        # An instance attribute shadows the class's ``run``; Celery's tracer reads task.run
        # when it is built (in the main process for solo/threads, in each pool child).
        task.run = run


def request_class(base_spec: Any, runtime: Runtime) -> type[Any]:
    """A subclass of the task's Request whose requeues go through :meth:`Ledger.restore`."""
    from celery.utils.imports import symbol_by_name

    base: type[Any] = symbol_by_name(base_spec)
    if issubclass(base, WorkerkitRequestMixin):
        return base
    cls = runtime.request_classes.get(base)
    if cls is None:
        # The runtime is a class attribute: a Request reaches it without a module global.
        namespace = {"_workerkit_runtime": runtime}
        cls = type(f"Workerkit{base.__name__}", (WorkerkitRequestMixin, base), namespace)
        runtime.request_classes[base] = cls
    return cls


class WorkerkitRequestMixin:
    """Requeues (a job's release, a lost pool child) by workerkit's restore, not kombu's.

    kombu's reject-with-requeue puts the payload back unchanged: a pool child killed by its
    task (out of memory, a segfault) would be redelivered forever with nothing counting, and a
    missing binding key drops the message (see Ledger._route). Ours counts the crash in the
    message (CRASHES_HEADER, so that the next run fails a poison message) and bumps the fencing
    generation, in the transaction that moves the message.
    """

    # Celery's Request has these (it is the other base).
    id: str
    type: str
    message: Any
    acknowledged: bool
    time_limits: tuple[float | None, float | None]
    send_event: Callable[..., Any]

    _workerkit_runtime: Runtime  # set by request_class()
    _workerkit_crashed = False
    #: Set just before its settle's script runs (the ack, or the requeue's restore).
    _workerkit_settling = False  # a settle is being retried in the background (outage.py)
    _workerkit_writing = False  # a settle script has been sent (runtime.py's renewal round)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        base: Any = super()
        base.__init__(*args, **kwargs)
        runtime = self._workerkit_runtime
        hard, soft = self.time_limits
        if hard and not soft and limited_by_workerkit(runtime.app, self.type):
            # A message's own hard limit (apply_async(time_limit=...)) on a task workerkit gave
            # its limits: Celery would take workerkit's soft limit for the message, and billiard
            # schedules a hard limit after the soft one, so the message's limit would only
            # apply at J - M. Its soft limit follows its hard one (M before it, as workerkit's).
            self.time_limits = (hard, soft_limit_for(float(hard), runtime.settings))
        # Held from here until acknowledged or requeued. Celery's task_received signal would
        # tell the same a little later, at several microseconds per message for its dispatch.
        self._workerkit_runtime.hold(self)

    def acknowledge(self) -> None:
        if not self.acknowledged:
            if getattr(self, "_workerkit_settling", False):
                return  # a settle of this message is being retried (outage.py)
            tag = str(self.message.delivery_tag)
            runtime = self._workerkit_runtime
            if not self._settle("ack", lambda: runtime.ledger.ack(tag, runtime.worker_id), "ACK"):
                return  # still held (its lease renewed) until the retried ack lands
        self._workerkit_runtime.forget(self)

    def _settle(self, what: str, write: Callable[[], bool], state: str) -> bool:
        """A fenced settle (ledger.ack or ledger.restore); False while it is being retried.

        The fence: a run whose lease expired (its worker was stopped) while another worker
        restored and took the message must not remove that worker's ``unacked`` entry, nor
        requeue it (ack.lua, Ledger.restore). A settle the broker cannot take now (a restart, a
        killed connection) is tried again at once, then in a thread while the message stays in
        hand, its lease renewed: a finished task's ack lands when the broker is back, instead of
        the task running again. Never kombu's unfenced path: whatever fails here, the message
        stays in ``unacked`` for a retry or crash recovery, never dropped.
        """
        deadline = time.monotonic() + SETTLE_INLINE
        # Before the script: a renewal round that runs between it and ``acknowledged`` finds
        # the message gone from ``unacked`` by our own hand, not lost (runtime.py).
        self._workerkit_writing = True
        try:
            done = retrying(what, self.id, write, keep_trying=lambda: time.monotonic() < deadline)
        except broker_errors():
            self._workerkit_settling = True
            retry_in_background(
                what,
                self.id,
                write,
                done=lambda ok: self._workerkit_runtime.call_soon(lambda: self._settled(ok, state)),
                failed=lambda exc: self._workerkit_runtime.call_soon(
                    lambda: self._settle_failed(what, exc)
                ),
            )
            return False
        except Exception as exc:
            self._settle_failed(what, exc)
            return True
        self._settled(done, state)
        return True

    def _settled(self, ok: bool, state: str) -> None:
        """The settle landed (or the fence refused it): kombu's in-memory part, not Redis's."""
        message = self.message
        with contextlib.suppress(Exception):
            message.channel.qos._quick_ack(message.delivery_tag)  # frees its prefetch slot
        with contextlib.suppress(Exception):
            message._state = state
        self.acknowledged = True
        if getattr(self, "_workerkit_settling", False):
            self._workerkit_settling = False
            self._workerkit_runtime.forget(self)
            if state == "REQUEUED":
                with contextlib.suppress(Exception):
                    self.send_event("task-rejected", requeue=True)
        if ok:
            return
        if state == "REQUEUED":
            log.warning(
                "message not requeued: acknowledged, held by another worker, or no queue",
                extra={"event": "requeue_skipped", "job_id": self.id},
            )
        else:
            log.warning(
                "not settled: another worker holds the message now (this run's lease expired)",
                extra={"event": "settle_fenced", "job_id": self.id},
            )

    def _settle_failed(self, what: str, exc: Exception) -> None:
        """Left in ``unacked``: once its lease expires, crash recovery puts it back."""
        log.error(
            "%s failed; the message stays unacknowledged for crash recovery",
            what,
            extra={"event": "settle_failed", "job_id": self.id, "what": what, "error": str(exc)},
        )
        message = self.message
        with contextlib.suppress(Exception):
            message.channel.qos._quick_ack(message.delivery_tag)
        self.acknowledged = True
        self._workerkit_settling = False
        self._workerkit_runtime.forget(self)

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        from celery.exceptions import WorkerLostError

        exc = getattr(exc_info, "exception", None)
        exc = getattr(exc, "exc", exc)  # ExceptionWithTraceback
        # Celery rejects with requeue for these when the pool child was lost (and
        # task_reject_on_worker_lost); a Reject raised by the job (a release) is not a crash.
        self._workerkit_crashed = isinstance(exc, WorkerLostError | SystemExit | KeyboardInterrupt)
        base: Any = super()
        return base.on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def reject(self, requeue: bool = False) -> None:
        base: Any = super()
        runtime = self._workerkit_runtime
        if self.acknowledged:
            base.reject(requeue=requeue)
            runtime.forget(self)
            return
        if getattr(self, "_workerkit_settling", False):
            return  # a settle of this message is being retried (outage.py)
        tag = str(self.message.delivery_tag)
        if not requeue:
            if self._settle(
                "reject", lambda: runtime.ledger.ack(tag, runtime.worker_id), "REJECTED"
            ):
                runtime.forget(self)
                with contextlib.suppress(Exception):
                    self.send_event("task-rejected", requeue=False)
            return
        crashed = self._workerkit_crashed

        def restore() -> bool:
            # Only while this worker holds the lease (or nobody does); leftmost: at the back
            # of the queue, as kombu's reject does. Its entries in Redis go in the transaction,
            # so only kombu's in-memory QoS is settled after it (_settled): a redelivery of the
            # same message keeps the same delivery tag, on another worker possibly by now.
            return runtime.ledger.restore(
                tag, owners=(runtime.worker_id,), crashed=crashed, leftmost=True
            )

        if self._settle("requeue", restore, "REQUEUED"):
            runtime.forget(self)
            with contextlib.suppress(Exception):
                self.send_event("task-rejected", requeue=True)
