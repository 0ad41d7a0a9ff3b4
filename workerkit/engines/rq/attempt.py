"""One attempt in the worker's main process: admission, its start (lease and count), its end.

The lease is taken in the same MULTI as RQ's own start bookkeeping, so that no attempt is ever
started unleased; its settle drops the lease in the same MULTI as RQ's end bookkeeping. A queue
entry that cannot be read never starts: it was popped already, so it is failed with the reason
right away, or dead-lettered when it names no job hash (not recording it would lose it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any
from uuid import uuid4

import redis
import redis.exceptions
from rq.exceptions import NoSuchJobError
from rq.executions import Execution, ExecutionRegistry
from rq.job import Job, JobStatus
from rq.utils import now
from rq.worker.base import WorkerStatus

from workerkit.engines.rq.jobs import META_KEY, encode_state, safe_func_name, wk_state
from workerkit.engines.rq.leases import AttemptKeys, Leases, Start
from workerkit.engines.rq.outage import RetryUnreachable
from workerkit.engines.rq.poison import dead_letter, describe_entry, fail_unreadable
from workerkit.engines.rq.serializers import UndecodableJob, serializer_for, undecodable
from workerkit.engines.rq.startup import UNREACHABLE
from workerkit.engines.rq.state import Attempt, WorkerState, released_or_lost
from workerkit.engines.rq.tasks import DEFAULT_MAX_ATTEMPTS
from workerkit.events import JobFinished, JobStarted, Outcome, PayloadRefused

if TYPE_CHECKING:
    from redis.client import Pipeline
    from rq.queue import Queue

__all__ = ("Attempts", "NotStarted")

log = logging.getLogger("workerkit.engines.rq")


class NotStarted(Exception):
    """A popped job that this worker does not start (see :meth:`Attempts.prepare_execution`)."""


def _unreadable(job_id: str, why: str) -> UndecodableJob:
    return UndecodableJob(
        f"job {job_id}: its job hash cannot be read ({why}); it was written into Redis by "
        "something other than RQ's enqueue, or corrupted",
        "undecodable",
    )


def _start_execution(pipeline: Pipeline[Any], job: Job, execution: Execution, ttl: int) -> None:
    """RQ's ``Execution.create`` for an execution built beforehand (so that a retry reuses it)."""
    execution.save(ttl=ttl, pipeline=pipeline)
    ExecutionRegistry(job_id=job.id, connection=pipeline).add(
        execution=execution, ttl=ttl, pipeline=pipeline
    )
    job.started_job_registry.add_execution(execution, pipeline=pipeline, ttl=ttl, xx=False)


def _log_job(message: str, event: str, job_id: str, task: str, **fields: Any) -> None:
    """The INFO line of an attempt's start or end."""
    log.info(message, extra={"event": event, "job_id": job_id, "task": task, **fields})


class Attempts(WorkerState):
    """Admitting, starting and ending attempts (the main process), and requeuing one taken back."""

    def _wk_take(self, queue: Queue, entry: bytes) -> Job | None:
        """The job a popped queue entry names, ready to start; None when there is none to run.

        An id whose hash is gone is skipped, as RQ skips it. Anything else that cannot be read
        is refused with the reason and the worker goes on: a job hash that does not restore or
        whose payload does not decode is failed; an entry that is not text, or names a key that
        is not a hash, goes to the queue's dead-letter list (``poison.py``).
        """
        try:
            job_id = entry.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._wk_dead_letter(queue, entry, f"the entry is not UTF-8 text ({exc})")
            return None
        try:
            job = self.job_class.fetch(
                job_id, connection=self.connection, serializer=self.serializer
            )
        except NoSuchJobError:
            if self.connection.exists(Job.key_for(job_id)):
                self._wk_refuse(queue, job_id, _unreadable(job_id, "it has no data"))
            return None  # gone (deleted, expired): skipped, as RQ skips it
        except redis.exceptions.ResponseError as exc:
            if "WRONGTYPE" not in str(exc):
                raise
            self._wk_dead_letter(queue, entry, f"{Job.key_for(job_id)} is not a hash ({exc})")
            return None
        except UNREACHABLE:
            raise
        except Exception as exc:  # a field RQ cannot parse: written by hand, or corrupted
            reason = _unreadable(job_id, f"RQ cannot restore it: {type(exc).__name__}: {exc}")
            self._wk_refuse(queue, job_id, reason)
            return None
        refusal = undecodable(job, self.serializer)
        if refusal is not None:
            self._wk_refuse(queue, job_id, refusal, job)
            return None
        job.serializer = serializer_for(job, self.serializer)
        return job

    def _wk_refuse(
        self,
        queue: Queue,
        job_id: str,
        refusal: UndecodableJob,
        job: Job | None = None,
    ) -> None:
        """Fail a job that cannot be read, with the reason, no attempt started; log and count it.

        It is failed as RQ fails a job (status, FailedJobRegistry, a result with the reason);
        when no ``Job`` could be built from its hash, field by field (``poison.fail_unreadable``).
        """
        log.error(
            "job refused: its payload cannot be decoded",
            extra={
                "event": "job_payload_refused",
                "job_id": job_id,
                "queue": queue.name,
                "reason": refusal.reason,
                "error": str(refusal),
            },
        )
        self._wk_send(PayloadRefused(job_id, queue.name, refusal.reason))
        error = f"{type(refusal).__module__}.{type(refusal).__qualname__}: {refusal}"
        try:
            by_rq = self._wk_write_failure(queue, job_id, error, job)
        except redis.exceptions.RedisError as exc:
            log.warning(
                "could not fail the refused job",
                extra={"event": "job_refusal_failed", "job_id": job_id, "error": str(exc)},
            )
            return
        if by_rq and job is not None:
            with contextlib.suppress(Exception):
                queue.enqueue_dependents(job)  # RQ's rule: those that allow a failed dependency

    def _wk_write_failure(self, queue: Queue, job_id: str, error: str, job: Job | None) -> bool:
        """Fail the job through RQ when it could be read (True), else field by field (False)."""
        if job is not None:
            try:
                with self.connection.pipeline() as pipeline:
                    job.set_status(JobStatus.FAILED, pipeline=pipeline)
                    job._handle_failure(error, pipeline, worker_name=self.name)
                    pipeline.execute()
            except redis.exceptions.RedisError:
                raise
            except Exception:  # noqa: S110 - RQ cannot write this job back: by hand, below
                pass
            else:
                return True
        fail_unreadable(
            self.connection, job_id, queue.name, error, worker=self.name, serializer=self.serializer
        )
        return False

    def _wk_dead_letter(self, queue: Queue, entry: bytes, reason: str) -> None:
        """An entry that names no job hash: to the queue's dead-letter list, logged, counted."""
        text = describe_entry(entry)
        try:
            key = dead_letter(self.connection, queue.name, entry, reason, self.name)
        except redis.exceptions.RedisError as exc:
            log.warning(
                "could not dead-letter a queue entry",
                extra={"event": "dead_letter_failed", "entry": text, "error": str(exc)},
            )
            key = None
        log.error(
            "queue entry dead-lettered: it names no job",
            extra={
                "event": "queue_entry_dead_lettered",
                "queue": queue.name,
                "entry": text,
                "reason": reason,
                "dead_letter_key": key,
            },
        )
        self._wk_send(PayloadRefused(text, queue.name, "undecodable"))

    def _wk_begin(self, job: Job) -> bool:
        """:meth:`prepare_execution`; False when the popped job is not to be run here."""
        try:
            self.prepare_execution(job)
        except NotStarted:
            return False
        return True

    def prepare_execution(self, job: Job) -> Execution:
        """RQ's start bookkeeping plus the lease and the attempt count, in one Lua script
        (``start.lua``): only while no other attempt holds the job and it is queued.

        Raises :class:`NotStarted` when the job is not to be run (another attempt has it, it is
        not queued any more, or the worker released its work while Redis was unreachable).
        """
        info = self.wk_app.info(safe_func_name(job))
        wk = wk_state(job)
        attempts = int(wk.get("attempts", 0)) + 1
        wk["attempts"] = attempts
        if "max_attempts" not in wk:
            wk["max_attempts"] = info.max_attempts if info else DEFAULT_MAX_ATTEMPTS
        limit = self._wk_run_limit(job, info.timeout if info else None)
        job.timeout = limit  # RQ's parent kills a horse at timeout + 60; keep them in step
        execution = Execution(uuid4().hex, job.id, job.connection, worker_name=self.name)
        keys = AttemptKeys(job.id, execution.id, job.origin)
        sent_at = self._wk_start_attempt(job, keys, self._wk_start_writes(job, execution, wk))
        self.execution = execution
        self._wk_attempt = Attempt(
            keys=keys,
            task=safe_func_name(job) or "<undecodable>",
            number=attempts,
            started=time.monotonic(),
            run_limit=limit,
            last_renewed=sent_at,
            checkpoint=wk.get("checkpoint"),
            stop_requested=self._wk_jobs_stop_requested,
        )
        # Neither the event nor the log line is built when nobody takes it (a plain `rq worker`
        # run has no supervisor): on a no-op job that is a large share of the per-job cost.
        if self._wk_events.connected:
            queued_for = None
            if job.enqueued_at is not None:
                queued_for = max(0.0, (now() - job.enqueued_at).total_seconds())
            # At once (a worker killed right after it is known to the supervisor), in one
            # write with the previous job's finish.
            self._wk_job_events.send_now(
                JobStarted(
                    job.id,
                    task=self._wk_attempt.task,
                    queue=job.origin,
                    attempt=attempts,
                    delivery=keys.ref(),
                    queued_for=queued_for,
                )
            )
        if log.isEnabledFor(logging.INFO):
            _log_job("job started", "job_started", job.id, self._wk_attempt.task, attempt=attempts)
        return execution

    def _wk_start_writes(self, job: Job, execution: Execution, wk: dict[str, Any]) -> list[Any]:
        """RQ's start writes and workerkit's state of the job, recorded (never sent as they
        are) for the start script to replay after its checks: they land with the lease, or
        nothing does."""
        recorder = self.connection.pipeline(transaction=False)
        _start_execution(recorder, job, execution, self.get_heartbeat_ttl(job))
        recorder.hset(job.key, META_KEY, encode_state(wk))
        if getattr(job, "workerkit_legacy", False):
            # An older worker kept the state in the user's meta: moved out, once.
            job.meta.pop(META_KEY, None)
            job.workerkit_legacy = False  # type: ignore[attr-defined]
            recorder.hset(job.key, "meta", job.serializer.dumps(job.meta))
        self.set_state(WorkerStatus.BUSY, pipeline=recorder)
        writes = [args for args, _ in recorder.command_stack]
        recorder.reset()
        return writes

    def _wk_start_attempt(self, job: Job, keys: AttemptKeys, writes: list[Any]) -> float:
        """Run the start script; the monotonic time its landing try was sent (the lease's
        start, as the worker bounds it). Raises :class:`NotStarted` when it did not start."""
        sent_at = time.monotonic()

        def start() -> Start:
            # The same writes (the same execution id) on every try: a start that landed but
            # whose reply was lost is recognised by its own lease.
            nonlocal sent_at
            sent_at = time.monotonic()
            return self._wk_leases.start(keys, writes)

        # The job was popped already: its start is retried while Redis is unreachable (a
        # restart, a killed connection), until the worker releases its work; then the popped
        # id is held and pushed back before the worker exits (drain.py).
        try:
            started = RetryUnreachable(
                "job start",
                job.id,
                lease_until=lambda: math.inf,
                until=lambda: -math.inf if self._wk_release_requested else math.inf,
            ).run(start)
        except UNREACHABLE as exc:
            self._wk_hold_popped(job, exc)
            raise NotStarted(job.id) from exc
        if not started.ok:
            log.warning(
                "popped job not started: %s",
                started.why,
                extra={"event": "job_start_refused", "job_id": job.id, "reason": started.why},
            )
            raise NotStarted(job.id)
        return sent_at

    def _wk_hold_popped(self, job: Job, exc: BaseException) -> None:
        """The start gave up (the worker releases its work, Redis unreachable): the popped id
        is held, to be pushed back to the front of its queue before the worker exits."""
        queue = next((q for q in self.queues if q.name == job.origin), None)
        if queue is None:  # pragma: no cover - a job is only popped from our own queues
            return
        self._wk_popped = (queue, job.id.encode())
        log.warning(
            "job popped but not started: Redis unreachable as the worker releases its work; "
            "it goes back to its queue when Redis answers",
            extra={
                "event": "popped_job_held",
                "job_id": job.id,
                "queue": queue.name,
                "error": f"{type(exc).__name__}: {exc}",
            },
        )

    def _wk_run_limit(self, job: Job, task_timeout: float | None) -> int:
        if task_timeout is not None:
            seconds = task_timeout
        elif job.timeout is not None and job.timeout > 0:
            seconds = float(job.timeout)
        else:
            seconds = self.wk_settings.job_timeout
        return max(1, math.ceil(seconds))

    def _wk_end(self, job: Job, attempt: Attempt, outcome: Outcome) -> None:
        attempt.horse_done.set()
        with self._wk_lock:
            self._wk_attempt = None
        if attempt.stop_pipe is not None:
            with contextlib.suppress(OSError):
                os.close(attempt.stop_pipe)
            attempt.stop_pipe = None
        attempt.unshare()
        self.execution = None
        if not attempt.rq_settled:
            with contextlib.suppress(redis.exceptions.RedisError):
                self.set_current_job_id(None)
        duration = time.monotonic() - attempt.started
        if self._wk_events.connected:
            self._wk_job_events.send(
                JobFinished(job.id, attempt.task, attempt.keys.queue, outcome, duration)
            )
        if log.isEnabledFor(logging.INFO):
            _log_job(
                "job finished",
                "job_finished",
                job.id,
                attempt.task,
                outcome=outcome,
                duration=round(duration, 3),
            )

    def _wk_settle_taken(self, job: Job, attempt: Attempt) -> Outcome:
        """The worker took the lease back ("release") and the job no longer runs: requeue it."""
        return released_or_lost(
            job.id,
            lambda: self._wk_recovery.release(attempt.keys, ["release"], give_back=True),
            "release failed; the lease will expire and the job be recovered",
        )

    def cleanup_execution(self, job: Job, pipeline: Pipeline[Any]) -> None:
        """RQ's end bookkeeping plus dropping the lease (and, on success, the checkpoint)."""
        attempt = self._wk_attempt
        if attempt is not None and attempt.keys.job_id == job.id:
            Leases.forget(pipeline, attempt.keys)
            wk = wk_state(job)
            if attempt.succeeded and wk.pop("checkpoint", None) is not None:
                pipeline.hset(job.key, META_KEY, encode_state(wk))
        execution = self.execution
        super().cleanup_execution(job, pipeline)  # type: ignore[misc]
        # RQ forgets the execution before its MULTI runs: when that MULTI fails and RQ runs its
        # bookkeeping again (a killed connection is a WatchError in its success loop), the
        # second run would leave the execution and its StartedJobRegistry entry behind.
        self.execution = execution
