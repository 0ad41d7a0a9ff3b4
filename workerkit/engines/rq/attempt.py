"""One attempt in the worker's main process: admission, its start (lease and count), its end.

The lease is taken in the same MULTI as RQ's own start bookkeeping, so that no attempt is ever
started unleased; its settle drops the lease in the same MULTI as RQ's end bookkeeping. A job
whose payload cannot be decoded never starts: it was popped already, so it is failed with the
reason right away (not failing it would lose it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any

import redis
import redis.exceptions
from rq.executions import Execution
from rq.job import JobStatus
from rq.utils import now
from rq.worker.base import WorkerStatus

from workerkit.engines.rq.jobs import META_KEY, encode_state, safe_func_name, wk_state
from workerkit.engines.rq.leases import AttemptKeys, Leases
from workerkit.engines.rq.serializers import serializer_for, undecodable
from workerkit.engines.rq.state import Attempt, WorkerState, released_or_lost
from workerkit.engines.rq.tasks import DEFAULT_MAX_ATTEMPTS
from workerkit.events import JobFinished, JobStarted, Outcome, PayloadRefused

if TYPE_CHECKING:
    from redis.client import Pipeline
    from rq.job import Job
    from rq.queue import Queue

__all__ = ("Attempts",)

log = logging.getLogger("workerkit.engines.rq")


def _log_job(message: str, event: str, job_id: str, task: str, **fields: Any) -> None:
    """The INFO line of an attempt's start or end."""
    log.info(message, extra={"event": event, "job_id": job_id, "task": task, **fields})


class Attempts(WorkerState):
    """Admitting, starting and ending attempts (the main process), and requeuing one taken back."""

    def _wk_admit(self, job: Job, queue: Queue) -> bool:
        """Whether ``job`` may start; one whose data or meta does not decode is failed here.

        It is failed as RQ fails a job (status, FailedJobRegistry, a result with the reason),
        with no attempt started, and the worker goes on with the next job.
        """
        refusal = undecodable(job, self.serializer)
        if refusal is None:
            job.serializer = serializer_for(job, self.serializer)
            return True
        log.error(
            "job refused: its payload cannot be decoded",
            extra={
                "event": "job_payload_refused",
                "job_id": job.id,
                "queue": queue.name,
                "reason": refusal.reason,
                "error": str(refusal),
            },
        )
        self._wk_events.send(PayloadRefused(job.id, queue.name, refusal.reason))
        error = f"{type(refusal).__module__}.{type(refusal).__qualname__}: {refusal}"
        try:
            with self.connection.pipeline() as pipeline:
                job.set_status(JobStatus.FAILED, pipeline=pipeline)
                job._handle_failure(error, pipeline, worker_name=self.name)
                pipeline.execute()
        except redis.exceptions.RedisError as exc:
            log.warning(
                "could not fail the refused job",
                extra={"event": "job_refusal_failed", "job_id": job.id, "error": str(exc)},
            )
            return False
        with contextlib.suppress(Exception):
            queue.enqueue_dependents(job)  # RQ's rule: those that allow a failed dependency
        return False

    def prepare_execution(self, job: Job) -> Execution:
        """RQ's start bookkeeping plus the lease and the attempt count, in one MULTI."""
        info = self.wk_app.info(safe_func_name(job))
        wk = wk_state(job)
        attempts = int(wk.get("attempts", 0)) + 1
        wk["attempts"] = attempts
        if "max_attempts" not in wk:
            wk["max_attempts"] = info.max_attempts if info else DEFAULT_MAX_ATTEMPTS
        limit = self._wk_run_limit(job, info.timeout if info else None)
        job.timeout = limit  # RQ's parent kills a horse at timeout + 60; keep them in step
        with self.connection.pipeline() as pipeline:
            heartbeat_ttl = self.get_heartbeat_ttl(job)
            execution = Execution.create(
                job, heartbeat_ttl, pipeline=pipeline, worker_name=self.name
            )
            keys = AttemptKeys(job.id, execution.id, job.origin)
            self._wk_leases.start(pipeline, keys)
            pipeline.hset(job.key, META_KEY, encode_state(wk))
            if getattr(job, "workerkit_legacy", False):
                # An older worker kept the state in the user's meta: moved out, once.
                job.meta.pop(META_KEY, None)
                pipeline.hset(job.key, "meta", job.serializer.dumps(job.meta))
                job.workerkit_legacy = False  # type: ignore[attr-defined]
            self.set_state(WorkerStatus.BUSY, pipeline=pipeline)
            pipeline.execute()
        self.execution = execution
        self._wk_attempt = Attempt(
            keys=keys,
            task=safe_func_name(job) or "<undecodable>",
            number=attempts,
            started=time.monotonic(),
            run_limit=limit,
            checkpoint=wk.get("checkpoint"),
            stop_requested=self._wk_jobs_stop_requested,
        )
        # Neither the event nor the log line is built when nobody takes it (a plain `rq worker`
        # run has no supervisor): on a no-op job that is a large share of the per-job cost.
        if self._wk_events.connected:
            queued_for = None
            if job.enqueued_at is not None:
                queued_for = max(0.0, (now() - job.enqueued_at).total_seconds())
            self._wk_events.send(
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
        self.execution = None
        if not attempt.rq_settled:
            with contextlib.suppress(redis.exceptions.RedisError):
                self.set_current_job_id(None)
        duration = time.monotonic() - attempt.started
        if self._wk_events.connected:
            self._wk_events.send(
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
        super().cleanup_execution(job, pipeline)  # type: ignore[misc]
