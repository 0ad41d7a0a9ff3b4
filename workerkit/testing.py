"""Test doubles for code that uses workerkit: no database, no server, no sleeping.

:class:`InMemoryQueue` is workerkit's queue contract
(:class:`~workerkit.engines.base.QueueBackend`) kept in a dict. It follows the same rules as the
SQL queue, checked by the same contract test suite: attempts count claims, a release gives the
attempt back, a lease that expires lets another worker claim the job, and every write after the
claim is fenced by the delivery's token. Give it a :class:`ManualClock` to expire leases and
make delayed jobs due without waiting::

    from workerkit import App
    from workerkit.testing import InMemoryQueue, ManualClock

    clock = ManualClock()
    queue = InMemoryQueue(clock=clock, lease_ttl=30)
    app = App(backend=queue)

    @app.task(max_attempts=3)
    def charge(order_id: int) -> None: ...

    job_id = charge.enqueue(7)
    [delivery] = queue.claim(["default"], worker_id="test", limit=1)
    clock.advance(31)                      # the worker "crashed": its lease runs out
    [again] = queue.claim(["default"], worker_id="other", limit=1)
    assert again.attempt == 2
    assert queue.get_job(job_id)["state"] == "running"

:class:`InMemoryIdempotencyStore` is the idempotency store contract
(:class:`~workerkit.idempotency.IdempotencyStore`), held to the same contract suite as the SQL
and Redis stores; with a :class:`ManualClock`, claims and results expire when the test says::

    store = InMemoryIdempotencyStore(clock=clock)
    app = App(backend=queue)                # an InMemoryQueue's app uses one by default

    @workerkit.idempotent(key="charge:{order_id}", store=store, in_progress_expiry=60)
    def charge(order_id: int) -> str: ...
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from workerkit.engines.base import Delivery, NewJob, QueueStats, StoreHealth
from workerkit.errors import LeaseLost
from workerkit.idempotency.memory import InMemoryIdempotencyStore
from workerkit.settings import ENGINE_DEFAULT_VISIBILITY_TIMEOUT
from workerkit.store._jobs import (
    CRASH_EXHAUSTED_ERROR,
    JOB_FIELDS,
    dump_json,
    lease_exhausted_error,
    load_json,
    ref_parts,
)
from workerkit.store.schema import JOB_STATES

if TYPE_CHECKING:
    from workerkit.app import App
    from workerkit.settings import Settings

__all__ = ("InMemoryIdempotencyStore", "InMemoryQueue", "ManualClock", "run_jobs")

log = logging.getLogger(__name__)


class ManualClock:
    """A clock that moves only when told to: ``clock()`` is the time, ``advance(s)`` moves it.

    It starts at the real epoch time (so ``run_at`` values computed from :func:`time.time`,
    such as a task's ``delay``, mean what they say) and is safe to share between threads.
    """

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        """Move the clock forward by ``seconds``; return the new time."""
        if seconds < 0:
            raise ValueError("a clock only moves forward")
        with self._lock:
            self._now += seconds
            return self._now


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


def run_jobs(
    app: App, *, timeout: float = 30.0, settings: Settings | None = None
) -> dict[str, int]:
    """Run the app's due jobs in this process until none is left; return the count by state.

    The real worker loop (:class:`~workerkit.worker.NativeWorker`) runs them, on the app's own
    queue (give the app an :class:`InMemoryQueue` in tests), with the job context, retries,
    checkpoints and idempotency keys working as in production. Jobs that become due later (a
    retry's backoff, a ``delay``) are left queued: advance a :class:`ManualClock` and call this
    again. Raises :class:`TimeoutError` when jobs are still running after ``timeout`` seconds.

    ::

        app = App(backend=InMemoryQueue())
        ...
        send_receipt.enqueue(42)
        assert run_jobs(app)["succeeded"] == 1
    """
    from workerkit.worker import NativeWorker

    base = settings or app.settings
    queues = sorted({task.queue for task in app.tasks.values()} | set(base.queues))
    settings = settings or base.replace(poll_interval=0.01, queues=",".join(queues))
    backend = app.backend
    worker = NativeWorker(app, settings, backend=backend)
    outcome: list[int] = []
    thread = threading.Thread(
        target=lambda: outcome.append(worker.run(install_signal_handlers=False)),
        name="workerkit-run-jobs",
        daemon=True,
    )
    thread.start()
    deadline = time.monotonic() + timeout
    idle_checks = 0
    try:
        # Idle means: nothing due in any queue and nothing running, twice in a row (a job that
        # finishes may have just enqueued another).
        while idle_checks < 2:
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs still running after {timeout:g}s")
            due = sum(backend.stats(queues).depth.values())
            idle_checks = idle_checks + 1 if due == 0 and worker.running_count == 0 else 0
            time.sleep(0.01)
    finally:
        worker.stop_fetching()
        thread.join(timeout)
    counts: dict[str, int] = backend.count_by_state()  # type: ignore[attr-defined]
    return counts
