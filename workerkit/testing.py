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
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from workerkit.engines.sql.memory import InMemoryQueue
from workerkit.idempotency import Claim, IdempotencyRecord

if TYPE_CHECKING:
    from workerkit.app import App
    from workerkit.settings import Settings

__all__ = ("InMemoryIdempotencyStore", "InMemoryQueue", "ManualClock", "run_jobs")


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
class _IdempotencyRecord:
    state: str
    fingerprint: str
    owner_token: str
    expires_at: float
    takeovers: int = 0
    result_json: str | None = None


class InMemoryIdempotencyStore:
    """The idempotency store contract in memory, for tests (thread-safe).

    ``clock`` returns epoch seconds and is the store's only notion of time; pass a
    :class:`ManualClock` to expire claims and results with ``clock.advance(...)``. Expired
    records stay (as rows of the SQL store do until purged) and are replaced by the next claim.
    """

    name = "memory"

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._records: dict[str, _IdempotencyRecord] = {}
        # One lock for everything: a claim sees and changes a record in one step, as the SQL
        # store's upsert and the Redis store's script do.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<InMemoryIdempotencyStore records={len(self._records)}>"

    def claim(self, key: str, fingerprint: str, *, in_progress_expiry: float) -> Claim:
        """Claim ``key``, or report the live record that holds it."""
        if not in_progress_expiry > 0:
            raise ValueError(f"in_progress_expiry must be above 0 seconds: {in_progress_expiry!r}")
        with self._lock:
            now = self.clock()
            record = self._records.get(key)
            if record is not None and record.expires_at > now:
                if record.fingerprint != fingerprint:
                    return Claim("mismatch")
                if record.state == "completed":
                    return Claim("replay", result_json=record.result_json)
                return Claim("in_progress", retry_after=record.expires_at - now)
            took_over = record is not None and record.state == "in_progress"
            token = secrets.token_hex(16)
            self._records[key] = _IdempotencyRecord(
                state="in_progress",
                fingerprint=fingerprint,
                owner_token=token,
                expires_at=now + in_progress_expiry,
                takeovers=record.takeovers + 1 if record is not None and took_over else 0,
            )
            return Claim("taken_over" if took_over else "claimed", token=token)

    def _held(self, key: str, token: str) -> _IdempotencyRecord | None:
        record = self._records.get(key)
        if record is None or record.state != "in_progress" or record.owner_token != token:
            return None
        return record

    def complete(self, key: str, token: str, result_json: str, *, retention: float) -> bool:
        """Record the result for ``retention`` seconds; False when ``token`` lost the key."""
        if not retention > 0:
            raise ValueError(f"retention must be above 0 seconds: {retention!r}")
        with self._lock:
            record = self._held(key, token)
            if record is None:
                return False
            record.state = "completed"
            record.result_json = result_json
            record.expires_at = self.clock() + retention
            return True

    def forget(self, key: str, token: str) -> bool:
        """Delete the claim ``token`` holds; False when it holds none."""
        with self._lock:
            if self._held(key, token) is None:
                return False
            del self._records[key]
            return True

    def get(self, key: str) -> IdempotencyRecord | None:
        """The record of ``key`` (expired ones included), or None."""
        with self._lock:
            record = self._records.get(key)
            if record is None:
                return None
            return IdempotencyRecord(
                key=key,
                state="completed" if record.state == "completed" else "in_progress",
                fingerprint=record.fingerprint,
                owner_token=record.owner_token,
                result_json=record.result_json,
                expires_in=record.expires_at - self.clock(),
                takeovers=record.takeovers,
            )

    def purge_expired(self, older_than: float = 0.0) -> int:
        """Delete records that expired over ``older_than`` seconds ago; return how many."""
        with self._lock:
            cutoff = self.clock() - older_than
            doomed = [key for key, r in self._records.items() if r.expires_at <= cutoff]
            for key in doomed:
                del self._records[key]
            return len(doomed)

    def close(self) -> None:
        """Nothing to release; the records stay readable."""


def run_jobs(
    app: App, *, timeout: float = 30.0, settings: Settings | None = None
) -> dict[str, int]:
    """Run the app's due jobs in this process until none is left; return the count by state.

    The real worker loop (:class:`~workerkit.engines.sql.worker.NativeWorker`) runs them, on the
    app's own queue (give the app an :class:`InMemoryQueue` in tests), with the job context,
    retries, checkpoints and idempotency keys working as in production. Jobs that become due
    later (a retry's backoff, a ``delay``) are left queued: advance a :class:`ManualClock` and
    call this again. Raises :class:`TimeoutError` when jobs are still running after ``timeout``
    seconds.

    ::

        app = App(backend=InMemoryQueue())
        ...
        send_receipt.enqueue(42)
        assert run_jobs(app)["succeeded"] == 1
    """
    from workerkit.engines.sql.worker import NativeWorker

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
