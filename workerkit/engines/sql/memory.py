"""InMemoryQueue: the sql engine's queue contract kept in a dict, for tests.

It follows the SQL queue's rules (attempts count claims, a release gives one back, an expired
lease lets another worker claim, every write after the claim is fenced by the token), held to
the same contract test suite. Public as :class:`workerkit.testing.InMemoryQueue`; it sits here,
next to the queue it imitates, so that production code never imports workerkit.testing.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from workerkit.engines.base import Delivery, NewJob, QueueStats, StoreHealth
from workerkit.engines.sql.rules import (
    CRASH_EXHAUSTED_ERROR,
    JOB_FIELDS,
    dump_json,
    lease_exhausted_error,
    load_json,
    ref_parts,
)
from workerkit.engines.sql.schema import JOB_STATES
from workerkit.errors import LeaseLost
from workerkit.settings import ENGINE_DEFAULT_VISIBILITY_TIMEOUT

__all__ = ("InMemoryQueue",)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Job:
    id: str
    queue: str
    task: str
    payload: str
    state: str
    attempts: int
    max_attempts: int
    run_at: float
    enqueued_at: float
    created_at: float
    updated_at: float
    seq: int  # insertion order, the tie-breaker after run_at
    lease_token: str | None = None
    lease_expires_at: float | None = None
    worker_id: str | None = None
    checkpoint: str | None = None  # JSON text, as the SQL queue stores it
    result: str | None = None
    last_error: str | None = None
    finished_at: float | None = None


class InMemoryQueue:
    """The queue contract in memory, for tests (thread-safe).

    ``clock`` returns epoch seconds and is the queue's only notion of time (lease expiry,
    due jobs, ages); pass a :class:`ManualClock` to control it. ``lease_ttl`` is V, how long a
    claim or heartbeat keeps a job (30 s, as the SQL queue's default).

    Checkpoints and results are stored as JSON text, so a value the SQL queue would refuse is
    refused here too (:class:`~workerkit.errors.PayloadError`), and a test cannot mutate what
    was saved through a reference it kept.

    :meth:`wait_for_jobs` waits in real time (bounded by its timeout) and is woken by
    :meth:`enqueue` and :meth:`release`; a test that advances a :class:`ManualClock` to make a
    delayed job due should claim again rather than wait.
    """

    name = "memory"

    def __init__(
        self,
        *,
        lease_ttl: float = ENGINE_DEFAULT_VISIBILITY_TIMEOUT["sql"],
        clock: Callable[[], float] = time.time,
    ) -> None:
        if lease_ttl <= 0:
            raise ValueError("lease_ttl must be above 0 seconds")
        self.lease_ttl = lease_ttl
        self.clock = clock
        self._jobs: dict[str, _Job] = {}
        self._seq = itertools.count()
        # One lock for everything: a claim must see and change the jobs in one step, as the
        # SQL queue's claim does in one transaction.
        self._cond = threading.Condition()
        self._wake_seq = 0
        self._seen = threading.local()
        self.healthy = True
        """Set to False to make :meth:`health` report the store as unavailable."""

    def __repr__(self) -> str:
        return f"<InMemoryQueue jobs={len(self._jobs)}>"

    def _wake(self) -> None:
        self._wake_seq += 1
        self._cond.notify_all()

    # --- the QueueBackend contract -------------------------------------------------------

    def enqueue(self, job: NewJob) -> bool:
        """Store the job; False (and no change) when a job with this id already exists."""
        with self._cond:
            if job.job_id in self._jobs:
                return False
            now = self.clock()
            self._jobs[job.job_id] = _Job(
                id=job.job_id,
                queue=job.queue,
                task=job.task,
                payload=job.payload,
                state="ready",
                attempts=0,
                max_attempts=job.max_attempts,
                run_at=now if job.run_at is None else job.run_at,
                enqueued_at=now,
                created_at=now,
                updated_at=now,
                seq=next(self._seq),
            )
            self._wake()
            return True

    def enqueue_many(self, jobs: Sequence[NewJob]) -> list[bool]:
        """Store the jobs under one lock (all at once); for each, whether it went in."""
        with self._cond:
            return [self.enqueue(job) for job in jobs]

    def claim(self, queues: Sequence[str], worker_id: str, limit: int) -> list[Delivery]:
        """Take up to ``limit`` runnable jobs (ready and due, or with an expired lease).

        A job whose lease expired with no attempts left is failed with the reason instead.
        """
        if limit < 1 or not queues:
            return []
        wanted = set(queues)
        with self._cond:
            now = self.clock()
            runnable = sorted(
                (
                    job
                    for job in self._jobs.values()
                    if job.queue in wanted
                    and (
                        (job.state == "ready" and job.run_at <= now)
                        or (
                            job.state == "running"
                            and job.lease_expires_at is not None
                            and job.lease_expires_at < now
                        )
                    )
                ),
                key=lambda job: (job.run_at, job.seq),
            )
            claimed: list[Delivery] = []
            for job in runnable:
                if len(claimed) >= limit:
                    break
                if job.state == "running" and job.attempts >= job.max_attempts:
                    job.last_error = lease_exhausted_error(
                        job.attempts, job.max_attempts, job.last_error
                    )
                    self._finish(job, "failed", now)
                    log.warning(
                        "job failed: lease expired with no attempts left",
                        extra={"event": "job_lease_exhausted", "job_id": job.id},
                    )
                    continue
                job.state = "running"
                job.attempts += 1
                job.lease_token = secrets.token_hex(16)
                job.lease_expires_at = now + self.lease_ttl
                job.worker_id = worker_id
                job.updated_at = now
                claimed.append(
                    Delivery(
                        job_id=job.id,
                        task=job.task,
                        queue=job.queue,
                        payload=job.payload,
                        attempt=job.attempts,
                        max_attempts=job.max_attempts,
                        token=job.lease_token,
                        checkpoint=load_json(job.checkpoint),
                        enqueued_at=job.run_at,
                        lease_expires_at=job.lease_expires_at,
                    )
                )
            return claimed

    def _owned(self, job_id: str, token: str) -> _Job | None:
        job = self._jobs.get(job_id)
        if job is None or job.state != "running" or job.lease_token != token:
            return None
        return job

    def _fenced(self, delivery: Delivery, what: str) -> _Job:
        job = self._owned(delivery.job_id, delivery.token)
        if job is None:
            raise LeaseLost(
                f"job {delivery.job_id}: this attempt's lease is gone (it expired and another "
                f"worker claimed the job, or the job was already settled); the {what} was not "
                "written"
            )
        job.updated_at = self.clock()
        return job

    @staticmethod
    def _finish(job: _Job, state: str, now: float) -> None:
        job.state = state
        job.lease_token = None
        job.lease_expires_at = None
        job.finished_at = now
        job.updated_at = now

    def extend(self, delivery: Delivery) -> bool:
        """Renew the lease for another ``lease_ttl``; False when it was lost."""
        with self._cond:
            job = self._owned(delivery.job_id, delivery.token)
            if job is None:
                return False
            job.updated_at = self.clock()
            job.lease_expires_at = job.updated_at + self.lease_ttl
            return True

    def save_checkpoint(self, delivery: Delivery, state: Any) -> None:
        """Store the checkpoint (JSON-serializable). Fenced."""
        encoded = dump_json(state, "a checkpoint")
        with self._cond:
            self._fenced(delivery, "checkpoint").checkpoint = encoded

    def ack(self, delivery: Delivery, result: Any) -> None:
        """The job succeeded: store the result, drop the checkpoint. Fenced."""
        encoded = dump_json(result, f"the result of task {delivery.task!r}")
        with self._cond:
            job = self._fenced(delivery, "result")
            job.result = encoded
            job.checkpoint = None
            self._finish(job, "succeeded", job.updated_at)

    def retry(self, delivery: Delivery, error: str, run_at: float) -> None:
        """The attempt failed; run again at ``run_at`` (the attempt stays consumed). Fenced."""
        with self._cond:
            job = self._fenced(delivery, "retry")
            job.state = "ready"
            job.run_at = run_at
            job.last_error = error
            job.lease_token = None
            job.lease_expires_at = None

    def fail(self, delivery: Delivery, error: str) -> None:
        """The job failed for good, keeping the error. Fenced."""
        with self._cond:
            job = self._fenced(delivery, "failure")
            job.last_error = error
            self._finish(job, "failed", job.updated_at)

    def release(self, delivery: Delivery) -> None:
        """Back to the queue now, checkpoint kept, attempt given back. Fenced."""
        with self._cond:
            self._release(self._fenced(delivery, "release"))

    def defer(self, delivery: Delivery, run_at: float, reason: str) -> None:
        """Run again at ``run_at``, attempt given back, ``reason`` kept. Fenced."""
        with self._cond:
            job = self._fenced(delivery, "defer")
            self._release(job)
            job.run_at = run_at
            job.last_error = reason

    def release_ref(self, ref: Mapping[str, Any], *, crashed: bool = False) -> bool:
        """Release by :meth:`Delivery.ref`; False when already settled.

        After a crash (``crashed``) the attempt stays consumed, and a job that has used its
        last one is failed with the reason.
        """
        job_id, token = ref_parts(ref)
        with self._cond:
            job = self._owned(job_id, token)
            if job is None:
                return False
            if not crashed:
                self._release(job)
            elif job.attempts >= job.max_attempts:
                job.last_error = CRASH_EXHAUSTED_ERROR
                self._finish(job, "failed", self.clock())
            else:
                self._release(job)
                job.attempts += 1  # the crash keeps the attempt that _release gave back
            return True

    def _release(self, job: _Job) -> None:
        now = self.clock()
        job.state = "ready"
        job.run_at = now
        job.attempts -= 1
        job.lease_token = None
        job.lease_expires_at = None
        job.updated_at = now
        self._wake()

    def wait_for_jobs(self, queues: Sequence[str], timeout: float) -> None:
        """Wait up to ``timeout`` real seconds for an enqueue or release.

        Returns at once when one happened since this thread's previous call.
        """
        with self._cond:
            since: int = getattr(self._seen, "seq", self._wake_seq)
            if timeout > 0:
                self._cond.wait_for(lambda: self._wake_seq > since, timeout)
            self._seen.seq = self._wake_seq

    def health(self) -> StoreHealth:
        """Always fine, unless a test set :attr:`healthy` to False."""
        if self.healthy:
            return StoreHealth(True, "in-memory queue")
        return StoreHealth(False, "in-memory queue marked unhealthy by the test")

    def stats(self, queues: Sequence[str]) -> QueueStats:
        """Depth (ready and due) and the oldest ready job's age, per queue."""
        depth = dict.fromkeys(queues, 0)
        oldest = dict.fromkeys(queues, 0.0)
        with self._cond:
            now = self.clock()
            for job in self._jobs.values():
                if job.queue in depth and job.state == "ready" and job.run_at <= now:
                    depth[job.queue] += 1
                    oldest[job.queue] = max(oldest[job.queue], now - job.run_at)
        return QueueStats(depth, oldest)

    def close(self) -> None:
        """Nothing to release; the jobs stay readable."""

    # --- inspection, as on the SQL queue -------------------------------------------------

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        """Everything about one job (checkpoint and result decoded), or None."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            data = {key: getattr(job, key) for key in JOB_FIELDS}
        data["checkpoint"] = load_json(data["checkpoint"])
        data["result"] = load_json(data["result"])
        return data

    def count_by_state(self, queue: str | None = None) -> dict[str, int]:
        """How many jobs are in each state (every state present, zeros included)."""
        counts = dict.fromkeys(JOB_STATES, 0)
        with self._cond:
            for job in self._jobs.values():
                if queue is None or job.queue == queue:
                    counts[job.state] += 1
        return counts

    def purge_finished(self, older_than: float, *, include_failed: bool = False) -> int:
        """Delete succeeded jobs (and failed ones, if asked) finished over ``older_than`` s ago."""
        states = {"succeeded", "failed"} if include_failed else {"succeeded"}
        with self._cond:
            cutoff = self.clock() - older_than
            doomed = [
                job.id
                for job in self._jobs.values()
                if job.state in states and job.finished_at is not None and job.finished_at < cutoff
            ]
            for job_id in doomed:
                del self._jobs[job_id]
        return len(doomed)
