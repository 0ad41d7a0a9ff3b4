"""One contract for every queue backend: in memory, SQLite and PostgreSQL.

Each test runs against all three (``memory`` uses a :class:`ManualClock` to expire leases; the
SQL backends use a short real lease and wait for the database clock to pass it). A behaviour
that only one backend has is a bug in the other two.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import pytest
import sqlalchemy as sa

from workerkit.engines.base import Delivery, NewJob, QueueBackend
from workerkit.engines.sql import SqlEngine, SqlQueue, upgrade
from workerkit.engines.sql.schema import db_now
from workerkit.errors import LeaseLost, SchemaOutOfDate
from workerkit.settings import Settings
from workerkit.testing import InMemoryQueue, ManualClock

SHORT_LEASE = 0.5  # V for tests that let leases expire on a real clock
LONG_LEASE = 60.0  # V for tests where no lease may expire, however slow the machine


class Queue(QueueBackend, Protocol):
    def get_job(self, job_id: str) -> dict[str, Any] | None: ...
    def count_by_state(self, queue: str | None = None) -> dict[str, int]: ...


@dataclass
class Backend:
    """How a test reaches one backend: queue objects on one store, its clock, lease expiry."""

    kind: str
    open: Callable[[float], Queue]  # a new queue object (another worker) on the same store
    now: Callable[[], float]  # the store's clock, epoch seconds
    expire: Callable[[Delivery], None]  # returns once the delivery's lease has run out

    def queue(self, lease_ttl: float = LONG_LEASE) -> Queue:
        return self.open(lease_ttl)


def _sql_backend(kind: str, url: str, opened: list[SqlQueue]) -> Backend:
    def open_queue(lease_ttl: float) -> Queue:
        queue = SqlQueue(url, settings=Settings(visibility_timeout=lease_ttl))
        opened.append(queue)
        return queue

    clock = SqlQueue(url)
    opened.append(clock)

    def now() -> float:
        with clock.engine.connect() as conn:
            return float(conn.execute(sa.select(db_now())).scalar_one())

    def expire(delivery: Delivery) -> None:
        assert delivery.lease_expires_at is not None
        deadline = time.monotonic() + 10 * SHORT_LEASE + 5
        while now() <= delivery.lease_expires_at:
            assert time.monotonic() < deadline, "the database clock did not pass the lease"
            time.sleep(0.05)

    return Backend(kind, open_queue, now, expire)


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "memory":
        clock = ManualClock()
        store = InMemoryQueue(lease_ttl=SHORT_LEASE, clock=clock)

        def open_memory(lease_ttl: float) -> Queue:
            # One store that every "worker" shares; leases only expire when the test advances
            # the clock, so one lease TTL serves every test.
            return store

        def expire_memory(delivery: Delivery) -> None:
            assert delivery.lease_expires_at is not None
            clock.advance(max(0.0, delivery.lease_expires_at - clock()) + 0.001)

        yield Backend("memory", open_memory, clock, expire_memory)
        return
    url: str = request.getfixturevalue(f"{request.param}_url")
    upgrade(url)  # a no-op when the session template already carries the schema
    opened: list[SqlQueue] = []
    try:
        yield _sql_backend(request.param, url, opened)
    finally:
        for queue in opened:
            queue.close()


def new_job(
    job_id: str | None = None,
    *,
    queue: str = "default",
    task: str = "tasks.work",
    payload: str = '{"args":[1],"kwargs":{}}',
    max_attempts: int = 3,
    run_at: float | None = None,
) -> NewJob:
    return NewJob(
        job_id=job_id or uuid.uuid4().hex,
        task=task,
        queue=queue,
        payload=payload,
        max_attempts=max_attempts,
        run_at=run_at,
    )


def claim_one(queue: Queue, worker: str = "w1", queues: tuple[str, ...] = ("default",)) -> Delivery:
    deliveries = queue.claim(list(queues), worker, 1)
    assert len(deliveries) == 1, deliveries
    return deliveries[0]


def job(queue: Queue, job_id: str) -> dict[str, Any]:
    found = queue.get_job(job_id)
    assert found is not None
    return found


# --- enqueue, claim, settle ------------------------------------------------------------------


def test_enqueue_claim_ack_stores_result_and_drops_checkpoint(backend: Backend) -> None:
    queue = backend.queue()
    assert queue.enqueue(new_job("j1", payload='{"args":[42],"kwargs":{}}'))

    delivery = claim_one(queue, "worker-a")
    assert delivery.job_id == "j1"
    assert delivery.task == "tasks.work"
    assert delivery.payload == '{"args":[42],"kwargs":{}}'
    assert delivery.attempt == 1
    assert delivery.max_attempts == 3
    assert delivery.checkpoint is None
    assert delivery.enqueued_at is not None
    assert delivery.lease_expires_at is not None
    assert delivery.lease_expires_at > delivery.enqueued_at
    running = job(queue, "j1")
    assert running["state"] == "running"
    assert running["worker_id"] == "worker-a"
    assert running["lease_token"] == delivery.token

    queue.save_checkpoint(delivery, {"cursor": 10})
    assert job(queue, "j1")["checkpoint"] == {"cursor": 10}
    queue.ack(delivery, {"sent": True})

    done = job(queue, "j1")
    assert done["state"] == "succeeded"
    assert done["result"] == {"sent": True}
    assert done["checkpoint"] is None
    assert done["lease_token"] is None
    assert done["finished_at"] is not None
    assert queue.claim(["default"], "worker-b", 10) == []
    assert queue.count_by_state() == {"ready": 0, "running": 0, "succeeded": 1, "failed": 0}


def test_duplicate_job_id_is_a_noop(backend: Backend) -> None:
    queue = backend.queue()
    assert queue.enqueue(new_job("same", payload='{"args":[1],"kwargs":{}}'))
    assert not queue.enqueue(new_job("same", payload='{"args":[2],"kwargs":{}}', queue="other"))

    stored = job(queue, "same")
    assert stored["payload"] == '{"args":[1],"kwargs":{}}'
    assert stored["queue"] == "default"
    assert queue.count_by_state()["ready"] == 1

    # Still a no-op while the first one runs and after it finished: ids are never reused.
    delivery = claim_one(queue)
    assert not queue.enqueue(new_job("same"))
    queue.ack(delivery, None)
    assert not queue.enqueue(new_job("same"))
    assert job(queue, "same")["state"] == "succeeded"


def test_retry_consumes_the_attempt_then_fail_keeps_the_error(backend: Backend) -> None:
    queue = backend.queue()
    queue.enqueue(new_job("flaky", max_attempts=2))

    first = claim_one(queue)
    assert first.attempt == 1
    queue.retry(first, "ValueError: boom", backend.now() - 1)
    retried = job(queue, "flaky")
    assert retried["state"] == "ready"
    assert retried["attempts"] == 1
    assert retried["last_error"] == "ValueError: boom"
    assert retried["lease_token"] is None

    second = claim_one(queue)
    assert second.attempt == 2
    assert second.token != first.token
    queue.fail(second, "ValueError: boom again")
    failed = job(queue, "flaky")
    assert failed["state"] == "failed"
    assert failed["attempts"] == 2
    assert failed["last_error"] == "ValueError: boom again"
    assert failed["finished_at"] is not None
    assert queue.claim(["default"], "w", 10) == []


def test_retry_waits_until_its_run_at(backend: Backend) -> None:
    queue = backend.queue()
    queue.enqueue(new_job("later"))
    queue.retry(claim_one(queue), "error", backend.now() + 3600)
    assert queue.claim(["default"], "w", 10) == []
    assert job(queue, "later")["state"] == "ready"


def test_release_keeps_the_checkpoint_gives_the_attempt_back_and_is_claimable_at_once(
    backend: Backend,
) -> None:
    queue = backend.queue()
    queue.enqueue(new_job("long", max_attempts=1))

    first = claim_one(queue, "pod-a")
    queue.save_checkpoint(first, {"done": 500})
    queue.release(first)

    released = job(queue, "long")
    assert released["state"] == "ready"
    assert released["attempts"] == 0
    assert released["checkpoint"] == {"done": 500}
    assert released["lease_token"] is None

    # max_attempts=1, yet releases never use it up: a deploy is not the job's fault.
    second = claim_one(queue, "pod-b")
    assert second.attempt == 1
    assert second.checkpoint == {"done": 500}
    queue.release(second)
    third = claim_one(queue, "pod-c")
    assert third.attempt == 1
    queue.ack(third, "ok")
    assert job(queue, "long")["state"] == "succeeded"


def test_release_ref_releases_from_another_queue_object_once(backend: Backend) -> None:
    worker = backend.queue()
    supervisor = backend.queue()
    worker.enqueue(new_job("orphan"))
    delivery = claim_one(worker)
    worker.save_checkpoint(delivery, [1, 2])

    assert supervisor.release_ref(delivery.ref())
    assert not supervisor.release_ref(delivery.ref())  # already back in the queue
    released = job(supervisor, "orphan")
    assert (released["state"], released["attempts"]) == ("ready", 0)
    assert released["checkpoint"] == [1, 2]
    with pytest.raises(LeaseLost):
        worker.ack(delivery, None)  # the dead worker's token no longer counts

    again = claim_one(supervisor)
    assert again.checkpoint == [1, 2]
    supervisor.ack(again, None)
    assert not supervisor.release_ref(again.ref())  # settled


def test_defer_gives_the_attempt_back_and_waits_until_run_at(backend: Backend) -> None:
    queue = backend.queue()
    queue.enqueue(new_job("busy", max_attempts=1))
    first = claim_one(queue, "pod-a")
    queue.defer(first, time.time() + 3600, "IdempotencyInProgress: key held")
    deferred = job(queue, "busy")
    assert (deferred["state"], deferred["attempts"]) == ("ready", 0)
    assert deferred["last_error"] == "IdempotencyInProgress: key held"
    assert queue.claim(["default"], "pod-b", 1) == []  # not before run_at
    with pytest.raises(LeaseLost):
        queue.defer(first, time.time(), "again")  # fenced like every other write


def test_release_after_a_crash_keeps_the_attempt_and_ends_a_crash_loop(backend: Backend) -> None:
    queue = backend.queue()
    queue.enqueue(new_job("oom", max_attempts=2))
    first = claim_one(queue, "pod-a")
    queue.save_checkpoint(first, {"at": 7})
    assert queue.release_ref(first.ref(), crashed=True)
    after_one = job(queue, "oom")
    assert (after_one["state"], after_one["attempts"]) == ("ready", 1)
    assert after_one["checkpoint"] == {"at": 7}

    second = claim_one(queue, "pod-b")
    assert second.attempt == 2
    assert queue.release_ref(second.ref(), crashed=True)
    failed = job(queue, "oom")
    assert (failed["state"], failed["attempts"]) == ("failed", 2)
    assert "exited unexpectedly" in failed["last_error"]
    assert queue.claim(["default"], "pod-c", 1) == []


# --- leases and fencing ----------------------------------------------------------------------


def test_expired_lease_is_reclaimed_and_fences_out_the_first_attempt(backend: Backend) -> None:
    worker_a = backend.queue(SHORT_LEASE)
    worker_b = backend.queue(SHORT_LEASE)
    worker_a.enqueue(new_job("contended"))

    first = claim_one(worker_a, "a")
    worker_a.save_checkpoint(first, {"step": 1})
    assert worker_b.claim(["default"], "b", 1) == []  # the lease still holds
    backend.expire(first)

    second = claim_one(worker_b, "b")  # the claim query itself takes the expired lease back
    assert second.job_id == "contended"
    assert second.attempt == 2  # the crash kept its attempt
    assert second.token != first.token
    assert second.checkpoint == {"step": 1}
    assert job(worker_b, "contended")["worker_id"] == "b"

    assert worker_a.extend(first) is False
    with pytest.raises(LeaseLost):
        worker_a.save_checkpoint(first, {"step": 99})
    with pytest.raises(LeaseLost):
        worker_a.ack(first, "stale result")
    with pytest.raises(LeaseLost):
        worker_a.retry(first, "stale error", backend.now())
    with pytest.raises(LeaseLost):
        worker_a.fail(first, "stale error")
    with pytest.raises(LeaseLost):
        worker_a.release(first)
    assert worker_a.release_ref(first.ref()) is False

    # None of the stale writes landed; the new owner is untouched and can finish.
    current = job(worker_b, "contended")
    assert current["state"] == "running"
    assert current["lease_token"] == second.token
    assert current["checkpoint"] == {"step": 1}
    assert current["attempts"] == 2
    assert current["result"] is None
    assert current["last_error"] is None
    assert worker_b.extend(second) is True
    worker_b.ack(second, "fresh result")
    assert job(worker_b, "contended")["result"] == "fresh result"


def test_expired_lease_nobody_claimed_is_still_the_holders(backend: Backend) -> None:
    queue = backend.queue(SHORT_LEASE)
    queue.enqueue(new_job("slow-heartbeat"))
    delivery = claim_one(queue)
    backend.expire(delivery)

    # The token, not the clock, says who owns the job: nobody took it, so it is still ours.
    assert queue.extend(delivery) is True
    queue.save_checkpoint(delivery, "late but fine")
    queue.ack(delivery, 1)
    assert job(queue, "slow-heartbeat")["state"] == "succeeded"


def test_extend_pushes_the_lease_expiry_forward(backend: Backend) -> None:
    queue = backend.queue(SHORT_LEASE)
    queue.enqueue(new_job("kept"))
    delivery = claim_one(queue)
    before = job(queue, "kept")["lease_expires_at"]
    if backend.kind == "memory":
        backend.expire(delivery)  # let the manual clock move
    else:
        time.sleep(0.05)
    assert queue.extend(delivery)
    assert job(queue, "kept")["lease_expires_at"] > before


def test_crash_looping_job_fails_after_max_attempts_with_the_reason(backend: Backend) -> None:
    queue = backend.queue(SHORT_LEASE)
    queue.enqueue(new_job("oom", max_attempts=2))
    queue.enqueue(new_job("fine", run_at=backend.now() + 0.0001))

    crashed = claim_one(queue, "a")
    assert crashed.job_id == "oom"
    backend.expire(crashed)
    crashed_again = claim_one(queue, "b")
    assert (crashed_again.job_id, crashed_again.attempt) == ("oom", 2)
    backend.expire(crashed_again)

    # The next claim fails the crash-looping job instead of running it, and still returns the
    # healthy job behind it.
    deliveries = queue.claim(["default"], "c", 1)
    assert [d.job_id for d in deliveries] == ["fine"]
    failed = job(queue, "oom")
    assert failed["state"] == "failed"
    assert failed["attempts"] == 2
    assert "lease expired" in failed["last_error"]
    assert "crashed" in failed["last_error"]
    assert failed["lease_token"] is None
    assert failed["finished_at"] is not None


def test_job_with_future_run_at_is_not_claimed(backend: Backend) -> None:
    queue = backend.queue()
    queue.enqueue(new_job("tomorrow", run_at=backend.now() + 86400))
    queue.enqueue(new_job("yesterday", run_at=backend.now() - 86400))

    assert [d.job_id for d in queue.claim(["default"], "w", 10)] == ["yesterday"]
    assert job(queue, "tomorrow")["state"] == "ready"
    stats = queue.stats(["default"])
    assert stats.depth == {"default": 0}


def test_claim_takes_only_named_queues_oldest_first_up_to_the_limit(backend: Backend) -> None:
    queue = backend.queue()
    base = backend.now() - 100
    for index in range(5):
        queue.enqueue(new_job(f"a{index}", queue="alpha", run_at=base + 4 - index))
    queue.enqueue(new_job("b0", queue="beta", run_at=base - 50))

    taken = queue.claim(["alpha"], "w", 3)
    assert [d.job_id for d in taken] == ["a4", "a3", "a2"]
    assert [d.job_id for d in queue.claim(["alpha", "beta"], "w", 2)] == ["b0", "a1"]
    assert queue.claim([], "w", 5) == []
    assert queue.claim(["alpha"], "w", 0) == []
    assert queue.count_by_state("alpha") == {
        "ready": 1,
        "running": 4,
        "succeeded": 0,
        "failed": 0,
    }


def test_concurrent_claimers_never_get_the_same_job(backend: Backend) -> None:
    producer = backend.queue()
    for index in range(200):
        producer.enqueue(new_job(f"job-{index:03d}"))
    workers = [backend.queue(), backend.queue()]  # two "processes", four threads each
    claims: list[list[str]] = [[] for _ in range(8)]
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def claim_until_empty(slot: int) -> None:
        queue = workers[slot % 2]
        try:
            start.wait(timeout=10)
            while True:
                deliveries = queue.claim(["default"], f"thread-{slot}", 3)
                if not deliveries:
                    return
                claims[slot].extend(d.job_id for d in deliveries)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claim_until_empty, args=(slot,)) for slot in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=50)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []

    claimed = [job_id for per_thread in claims for job_id in per_thread]
    assert len(claimed) == len(set(claimed)), "a job was handed to two claimers"
    assert sorted(claimed) == [f"job-{index:03d}" for index in range(200)]
    assert producer.count_by_state()["running"] == 200


# --- waking, stats, health -------------------------------------------------------------------


def test_wait_for_jobs_returns_early_when_a_job_is_enqueued(backend: Backend) -> None:
    worker = backend.queue()
    producer = backend.queue() if backend.kind != "memory" else worker
    # The worker learns of another queue object's enqueue (another connection, as another
    # process's would be) through NOTIFY on PostgreSQL, through the file's data version on
    # SQLite. Let the listener connect first (connecting wakes waiters once, by design).
    if backend.kind != "memory":
        worker.wait_for_jobs(["default"], 5)
    waited: list[float] = []

    def wait() -> None:
        started = time.monotonic()
        worker.wait_for_jobs(["default"], 20)
        waited.append(time.monotonic() - started)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.2)
    producer.enqueue(new_job("wake-up"))
    waiter.join(timeout=25)
    assert waited, "wait_for_jobs did not return"
    assert waited[0] < 10, f"woke only after {waited[0]:.1f}s: the enqueue did not wake it"


def test_wait_for_jobs_times_out_when_nothing_comes(backend: Backend) -> None:
    queue = backend.queue()
    if backend.kind != "memory":
        queue.wait_for_jobs(["default"], 5)  # returns when the listener has connected
    started = time.monotonic()
    queue.wait_for_jobs(["default"], 0.3)
    assert 0.25 <= time.monotonic() - started < 5


def test_stats_reports_depth_and_oldest_ready_age(backend: Backend) -> None:
    queue = backend.queue()
    now = backend.now()
    queue.enqueue(new_job("old", queue="mail", run_at=now - 120))
    queue.enqueue(new_job("new", queue="mail", run_at=now - 1))
    queue.enqueue(new_job("future", queue="mail", run_at=now + 3600))
    queue.enqueue(new_job("other", queue="reports", run_at=now - 5))
    queue.enqueue(new_job("running", queue="reports", run_at=now - 500))
    claim_one(queue, queues=("reports",))  # takes "running", the oldest

    stats = queue.stats(["mail", "reports", "empty"])
    assert stats.depth == {"mail": 2, "reports": 1, "empty": 0}
    assert 119 <= stats.oldest_ready_age["mail"] < 200
    assert 4 <= stats.oldest_ready_age["reports"] < 100
    assert stats.oldest_ready_age["empty"] == 0.0


def test_health_is_ok_on_a_current_store(backend: Backend) -> None:
    health = backend.queue().health()
    assert health.ok, health.reason


# --- SQL only ---------------------------------------------------------------------------------


def test_unmigrated_database_is_not_healthy_and_is_never_migrated(
    blank_database_url: str,
) -> None:
    unmigrated_url = blank_database_url
    queue = SqlQueue(unmigrated_url, settings=Settings())
    try:
        health = queue.health()
        assert not health.ok
        assert "workerkit db upgrade" in health.reason
        with pytest.raises(SchemaOutOfDate, match="workerkit db upgrade"):
            queue.claim(["default"], "w", 1)
        with pytest.raises(SchemaOutOfDate, match="workerkit db upgrade"):
            queue.enqueue(new_job("too-early"))
        assert not queue.health().ok  # neither call created the tables

        upgrade(unmigrated_url)
        assert queue.health().ok
        assert queue.claim(["default"], "w", 1) == []
    finally:
        queue.close()


def test_sql_engine_releases_in_flight_refs(database_url: str) -> None:
    upgrade(database_url)
    settings = Settings(database_url=database_url)
    queue = SqlQueue(database_url, settings=settings)
    try:
        for index in range(3):
            queue.enqueue(new_job(f"inflight-{index}"))
        deliveries = queue.claim(["default"], "dying-worker", 3)
        queue.ack(deliveries[0], None)

        released = SqlEngine().release_in_flight(settings, [d.ref() for d in deliveries])

        assert released == 2
        assert queue.count_by_state() == {"ready": 2, "running": 0, "succeeded": 1, "failed": 0}
        assert SqlEngine().release_in_flight(settings, []) == 0
    finally:
        queue.close()
