"""Running one attempt (in the work horse, or the simple worker's main thread) and settling it.

Every settle is fenced: the lease moves ``run`` -> ``settle`` before RQ's result bookkeeping, so
nobody may release or recover the job meanwhile, and an attempt that lost its lease settles
nothing (its job comes back through crash recovery).
"""

from __future__ import annotations

import logging
import random
import sys
import time
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import redis
import redis.exceptions
from rq.exceptions import DeserializationError
from rq.job import Job, JobStatus, Retry
from rq.timeouts import JobTimeoutException
from rq.utils import now

from workerkit.engines.attempt import (
    Defer,
    Fail,
    Release,
    RetryOrFail,
    Rules,
    StandDown,
    Verdict,
    check_arguments,
    verdict_for,
)
from workerkit.engines.rq.jobs import encode_state, wk_state
from workerkit.engines.rq.leases import SETTLE_TTL_MS, started_key
from workerkit.engines.rq.outage import Fenced, RetryUnreachable, lease_bound
from workerkit.engines.rq.startup import UNREACHABLE
from workerkit.engines.rq.state import Attempt, WorkerState, released_or_lost
from workerkit.engines.rq.tasks import TaskNotAllowed
from workerkit.errors import JobInterrupted, LeaseLost, StoreUnavailable
from workerkit.events import CheckpointSaved, Outcome, client
from workerkit.idempotency import outcome_of
from workerkit.job import JobContext

if TYPE_CHECKING:
    from rq.queue import Queue

__all__ = ("DEFER_BACKOFF", "RULES", "SETTLE_AGAIN", "Perform", "defer_backoff")

log = logging.getLogger("workerkit.engines.rq")

#: A job whose idempotency key another live attempt holds comes back after min(the holder's
#: claim expiry, this backoff with equal jitter): soon enough to replay the holder's result
#: shortly after it completes, spread out so that a burst of duplicates does not come back
#: together. Deferred jobs are put back by the recovery scan, so add up to one scan interval.
DEFER_BACKOFF: Final = 2.0

#: How an attempt's exception ends it (docs/concepts/attempts.md): RQ's own time limit, and the
#: jobs no attempt can run (a function the app does not allow, a payload that does not load).
RULES: Final = Rules(
    timeouts=(JobTimeoutException,), permanent=(TaskNotAllowed, DeserializationError)
)


#: The lease states a settle retried after a connection error accepts: its own ``run``, its own
#: ``settle`` (the first try landed, its reply was lost), or none at all (it expired while Redis
#: was down) as long as the attempt is still a started member, i.e. nobody took the job.
SETTLE_AGAIN: Final = ("run", "settle", "none")


def _unreachable_before_claim(exc: BaseException, context: JobContext | None) -> bool:
    """The job raised StoreUnavailable before any idempotency claim of it landed."""
    return isinstance(exc, StoreUnavailable) and context is not None and outcome_of(context) is None


def _unreachable_before_the_body(exc: BaseException) -> bool:
    """Redis went away inside RQ's ``Job.perform`` before it called the job's function (its
    ``PERSIST`` of the job hash comes first): nothing of the job ran. Told by the traceback,
    which holds no frame of RQ's ``Job._execute`` (the call of the function) then."""
    if not isinstance(exc, UNREACHABLE):
        return False
    return not any(
        frame.f_code.co_name == "_execute" for frame, _ in traceback.walk_tb(exc.__traceback__)
    )


def defer_backoff() -> float:
    """:data:`DEFER_BACKOFF` with equal jitter (drawn only when a job is deferred)."""
    return DEFER_BACKOFF / 2 + random.uniform(0, DEFER_BACKOFF / 2)


class Perform(WorkerState):
    """The job's run and the mapping of how it ended to an outcome, settled through RQ."""

    def perform_job(self, job: Job, queue: Queue) -> bool:
        attempt = self._wk_attempt
        if attempt is None:  # pragma: no cover - only when RQ calls us outside execute_job
            raise RuntimeError("perform_job without an attempt")
        try:
            attempt.outcome = self._wk_perform(job, queue, attempt)
        except JobInterrupted:
            # Our interrupt landed after the job's own code (RQ's bookkeeping, the way out).
            attempt.outcome = "released" if attempt.releasing else "lease_lost"
        return attempt.outcome in ("succeeded", "skipped_duplicate")

    def _wk_context(self, job: Job, queue: Queue, attempt: Attempt) -> JobContext:
        leases = self._wk_leases

        def save(state: Any) -> None:
            wk = wk_state(job)
            wk["checkpoint"] = state
            encoded = encode_state(wk)
            # Retried while the lease surely holds; after that the job hears Redis's error.
            retry = self._wk_retry(attempt, "checkpoint", lambda: self._wk_lease_until(attempt))
            if not retry.run(lambda: leases.write_state(attempt.keys, encoded)):
                raise LeaseLost(
                    f"job {job.id}: this attempt's lease is gone; the checkpoint was not written"
                )

        def saved(context: JobContext) -> None:
            client("executor").send(CheckpointSaved(context.job_id, context.task, context.queue))

        fired = wk_state(job)  # a scheduler's job: its schedule and fire time (rq/scheduling.py)
        fire_time = fired.get("fire_time")
        context = JobContext(
            job_id=job.id,
            task=attempt.task,
            queue=queue.name,
            attempt=attempt.number,
            checkpoint=attempt.checkpoint,
            deadline=time.time() + attempt.run_limit,
            checkpoint_interval=self.wk_settings.checkpoint_interval,
            save=save,
            on_checkpoint_saved=saved,
            schedule=fired.get("schedule") if isinstance(fired.get("schedule"), str) else None,
            fire_time=float(fire_time) if isinstance(fire_time, (int, float)) else None,
        )
        if attempt.stop_requested:
            context.request_stop()
        return context

    def _wk_perform(self, job: Job, queue: Queue, attempt: Attempt) -> Outcome:
        registry = queue.started_job_registry
        context: JobContext | None = None
        try:
            if not self._wk_prepare(job, attempt):
                return "lease_lost"  # not run; its lease expires and the job is recovered
            job.started_at = now()
            context = self._wk_context(job, queue, attempt)
            attempt.context = context
            check_arguments(job.func, job.args, job.kwargs)
            return_value = self._wk_call(job, attempt, context)
        except BaseException as exc:
            exc_info = sys.exc_info()
            lost = attempt.lease_lost or (context is not None and context.lease_lost)
            verdict = verdict_for(
                exc, RULES, backoff=defer_backoff, releasing=attempt.releasing, lease_lost=lost
            )
            if lost and not attempt.releasing:
                # The lease is gone, or about to be (the horse's watchdog): this attempt writes
                # nothing more, not even its own release; the job comes back through recovery.
                return "lease_lost"
            unrun = _unreachable_before_claim(exc, context) or _unreachable_before_the_body(exc)
            if unrun and not (attempt.releasing or lost):
                # Redis went away before the job's function was called, or before its
                # idempotency claim landed: nothing of the job ran, so it goes back unrun (no
                # attempt used up) instead of failing.
                return self._wk_defer(job, attempt, defer_backoff(), f"Redis unreachable: {exc}")
            match verdict:
                case Release():
                    return self._wk_release_self(job, attempt)
                case StandDown(outcome=outcome):
                    return outcome
                case Defer(delay=delay, reason=reason):
                    return self._wk_defer(job, attempt, delay, reason)
                case _:  # Fail, RetryOrFail (RQ's rules have no Retried, no Propagate)
                    if not self._wk_end_execution(job, attempt, job.failure_callback_timeout):
                        return "lease_lost"
                    attempt.rq_settled = True
                    return self._wk_fail_settled(job, queue, registry, attempt, exc_info, verdict)
        if not self._wk_end_execution(job, attempt, job.success_callback_timeout):
            return "lease_lost"
        attempt.rq_settled = True
        try:
            job._result = return_value
            if isinstance(return_value, Retry):
                assert self.execution is not None
                self.handle_job_retry(
                    job=job,
                    queue=queue,
                    retry=return_value,
                    started_job_registry=registry,
                    execution=self.execution,
                )
                return "retried"
            job._status = JobStatus.FINISHED
            job.execute_success_callback(self.death_penalty_class, return_value)
        except BaseException as exc:
            exc_info = sys.exc_info()
            verdict = verdict_for(exc, RULES, backoff=defer_backoff)
            return self._wk_fail_settled(job, queue, registry, attempt, exc_info, verdict)
        attempt.succeeded = True
        execution = self.execution

        def succeed() -> None:
            self.execution = execution  # RQ's cleanup clears it; a retry writes it again
            self.handle_job_success(job=job, queue=queue, started_job_registry=registry)

        if not self._wk_settle_write(attempt, "job result", succeed):
            return "lease_lost"
        job.send_webhooks(JobStatus.FINISHED)
        # RQ's INFO line; workerkit's job_finished says it (one line per job less).
        self.log.debug("Worker %s: %s: Job OK (%s)", self.name, queue.name, job.id)
        # A replay returned the stored result of the run that held the key: nothing ran.
        return "skipped_duplicate" if outcome_of(context) == "replayed" else "succeeded"

    def _wk_call(self, job: Job, attempt: Attempt, context: JobContext) -> Any:
        """The job's own code, under RQ's time limit and, in a work horse, its lease watchdog."""
        watchdog = self._wk_watchdog  # the work horse's (worker.py)
        with context.activate():
            attempt.in_job = True
            if watchdog is not None:
                watchdog.begin(context)
            try:
                with self.death_penalty_class(
                    attempt.run_limit, JobTimeoutException, job_id=job.id
                ):
                    return job.perform()
            finally:
                attempt.in_job = False
                if watchdog is not None:
                    watchdog.end(context)

    def _wk_prepare(self, job: Job, attempt: Attempt) -> bool:
        """RQ's start bookkeeping in the horse, retried while Redis is unreachable and the lease
        surely holds (the same writes each time); False when it never landed."""
        retry = self._wk_retry(attempt, "job start", lambda: self._wk_lease_until(attempt))
        try:
            retry.run(lambda: self.prepare_job_execution(job, remove_from_intermediate_queue=False))
        except UNREACHABLE:
            return False
        return True

    def _wk_end_execution(self, job: Job, attempt: Attempt, heartbeat_ttl: int) -> bool:
        """RQ's ``handle_execution_ended`` and the move to ``settle``, in one round trip.

        The move to ``settle`` must come before RQ's result bookkeeping (nobody may release or
        recover the job while it is being settled); sharing the round trip RQ makes anyway
        keeps the fence free for throughput (bench/rq_overhead.py). Redis unreachable: tried
        again (:meth:`_wk_settle_again`).
        """
        job.ended_at = now()
        attempt.mark_settling()
        ttl = max(SETTLE_TTL_MS, self._wk_leases.lease_ms)
        # In a work horse the first try goes on RQ's connection, open since the job's start:
        # the short-timeout client would open one more connection per horse (~0.6 ms of a
        # forking job's ~26 ms here). A Redis that hangs holds it no longer than RQ's own
        # result write right after does (RQ's socket timeout); a connection error is retried
        # on the short-timeout client (_wk_settle_again), as in the worker's own process.
        client = self.connection if self._is_horse else self._wk_redis
        try:
            with client.pipeline(transaction=False) as pipeline:
                job.heartbeat(now(), heartbeat_ttl, pipeline=pipeline)
                self._wk_leases.transition_in(pipeline, attempt.keys, ["run"], "settle", ttl)
                moved = pipeline.execute(raise_on_error=False)[-1]
        except UNREACHABLE:
            return self._wk_settle_again(job, attempt, heartbeat_ttl)
        except redis.exceptions.RedisError:
            return False  # the lease will expire and the job be recovered
        if isinstance(moved, redis.exceptions.NoScriptError):
            return self._wk_claim_settle(attempt)  # the script did not run; this loads it
        if isinstance(moved, UNREACHABLE):
            return self._wk_settle_again(job, attempt, heartbeat_ttl)
        if isinstance(moved, Exception):
            return False
        return bool(moved)

    def _wk_lease_until(self, attempt: Attempt) -> float:
        """Until when (monotonic) this attempt's lease surely holds, from its last renewal."""
        return lease_bound(attempt.renewed_at(), self._wk_lease_ttl)

    def _wk_retry(
        self, attempt: Attempt, what: str, until: Callable[[], float] | None = None
    ) -> RetryUnreachable:
        return RetryUnreachable(
            what, attempt.keys.job_id, lambda: self._wk_lease_until(attempt), until=until
        )

    def _wk_settle_again(self, job: Job, attempt: Attempt, heartbeat_ttl: int) -> bool:
        """The move to ``settle`` after a connection error: retried until Redis answers.

        Not bounded by the lease: the token decides (:data:`SETTLE_AGAIN`). A release stops it
        (the worker's SIGTERM interrupts the horse), as does the worker's death.
        """
        ttl = max(SETTLE_TTL_MS, self._wk_leases.lease_ms)

        def move() -> bool:
            moved = self._wk_leases.transition(attempt.keys, SETTLE_AGAIN, "settle", ttl)
            if moved:
                job.heartbeat(now(), heartbeat_ttl)
            return moved

        try:
            return self._wk_retry(attempt, "settle").run(move)
        except redis.exceptions.RedisError:
            return False

    def _wk_settle_write(self, attempt: Attempt, what: str, write: Callable[[], None]) -> bool:
        """RQ's end bookkeeping (``write``, one MULTI), retried while Redis is unreachable.

        Before each retry the attempt takes its ``settle`` lease again, fenced by its token: if
        another worker took the job meanwhile, nothing is written (False).
        """
        tries = 0
        ttl = max(SETTLE_TTL_MS, self._wk_leases.lease_ms)

        def once() -> None:
            nonlocal tries
            tries += 1
            if tries > 1 and not self._wk_leases.transition(
                attempt.keys, SETTLE_AGAIN, "settle", ttl
            ):
                if self._wk_leases.settled_by(attempt.keys):
                    landed.append(True)  # the first try landed; its reply was lost
                    return
                raise Fenced
            write()

        landed: list[bool] = []

        try:
            self._wk_retry(attempt, what).run(once)
        except Fenced:
            log.warning(
                "settle fenced: another worker took the job while Redis was unreachable",
                extra={"event": "lease_lost", "job_id": attempt.keys.job_id},
            )
            return False
        if landed:
            log.info(
                "%s had landed before its reply was lost",
                what,
                extra={"event": "settle_reply_lost", "job_id": attempt.keys.job_id},
            )
        return True

    def _wk_claim_settle(self, attempt: Attempt) -> bool:
        try:
            return self._wk_leases.transition(
                attempt.keys, ["run"], "settle", max(SETTLE_TTL_MS, self._wk_leases.lease_ms)
            )
        except redis.exceptions.RedisError:
            return False  # the lease will expire and the job be recovered

    def _wk_fail_settled(
        self,
        job: Job,
        queue: Queue,
        registry: Any,
        attempt: Attempt,
        exc_info: tuple[type[BaseException], BaseException, TracebackType | None]
        | tuple[None, None, None],
        verdict: Verdict,
    ) -> Outcome:
        """RQ's failure handling (retry with ``Retry``, else the failed registry), settled.

        ``verdict`` is what :data:`RULES` make of the exception: a :class:`Fail` is never retried.
        """
        job._status = JobStatus.FAILED
        exc_string = "".join(traceback.format_exception(*exc_info))
        if isinstance(verdict, Fail):
            job.retries_left = 0  # the same on every attempt: never retried
        try:
            job.execute_failure_callback(self.death_penalty_class, *exc_info)
        except BaseException:
            exc_info = sys.exc_info()
            exc_string = "".join(traceback.format_exception(*exc_info))
        self.handle_exception(job, *exc_info)
        retry = job.should_retry
        retries_left, execution = job.retries_left, self.execution

        def fail() -> None:
            # RQ swallows its pipeline's errors here: whether it landed is read back (the MULTI
            # drops the started member). A retry starts from the same state.
            job.retries_left, self.execution = retries_left, execution
            self.handle_job_failure(
                job=job, queue=queue, started_job_registry=registry, exc_string=exc_string
            )
            keys = attempt.keys
            if self._wk_redis.zscore(started_key(keys.queue), keys.member) is not None:
                raise redis.exceptions.ConnectionError("the failure was not written")

        if not self._wk_settle_write(attempt, "job failure", fail):
            return "lease_lost"
        if isinstance(verdict, RetryOrFail) and verdict.timed_out:
            return "timed_out"
        return "retried" if retry else "failed"

    def _wk_release_self(self, job: Job, attempt: Attempt) -> Outcome:
        """The job called ``current_job().release()``: requeue it now, attempt given back."""
        wk = wk_state(job)
        wk["attempts"] = max(0, attempt.number - 1)
        state = encode_state(wk)
        return released_or_lost(
            job.id, lambda: self._wk_leases.requeue(attempt.keys, ["run"], state), "release failed"
        )

    def _wk_defer(self, job: Job, attempt: Attempt, delay: float, reason: str) -> Outcome:
        """Another live attempt holds the job's idempotency key: not now, attempt given back.

        As the native engine's ``defer``: waiting is not a failure, so it must not use up the
        attempts (or the RQ ``Retry`` left) that crash recovery and real failures depend on. The job
        goes to RQ's ScheduledJobRegistry (``rq info`` shows it as scheduled), fenced by the
        lease; the recovery scan of any live workerkit worker puts it back when it is due.
        """
        wk = wk_state(job)
        wk["attempts"] = max(0, attempt.number - 1)
        retry = self._wk_retry(attempt, "defer", lambda: self._wk_lease_until(attempt))
        try:
            deferred = retry.run(
                lambda: self._wk_leases.defer(
                    attempt.keys, ["run"], encode_state(wk), time.time() + delay
                )
            )
        except redis.exceptions.RedisError as exc:
            log.warning(
                "defer failed; the lease will expire and the job be recovered",
                extra={"event": "defer_failed", "job_id": job.id, "error": str(exc)},
            )
            return "lease_lost"
        if not deferred:
            return "lease_lost"
        log.info(
            "job deferred: its idempotency key is held by another live run",
            extra={
                "event": "job_deferred",
                "job_id": job.id,
                "delay": round(delay, 3),
                "reason": reason,
            },
        )
        return "deferred"
