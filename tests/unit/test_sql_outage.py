"""Riding out a store outage: the backoff, the lease bound, retried writes.

The worker tests run the real loop on the in-memory queue with a write made to fail the way
``SqlQueue`` fails when its database is down (StoreUnavailable); the real database outages
are in tests/e2e/test_sql_store_outage.py and test_sql_startup.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.native_worker import Harness, wait_until
from workerkit.app import App
from workerkit.engines.sql import SqlQueue
from workerkit.engines.sql.outage import (
    LANDING_MARGIN,
    RETRY_MAX,
    ClaimPause,
    RetryingWrite,
    backoff,
    lease_bound,
    recovery_grace,
)
from workerkit.engines.sql.worker import NativeWorker
from workerkit.errors import LeaseLost, StoreUnavailable
from workerkit.events import StoreHealth
from workerkit.job import current_job
from workerkit.settings import Settings

DOWN = StoreUnavailable("postgresql database unavailable: OperationalError: connection refused")


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    if h.worker is not None and h.thread is not None and h.thread.is_alive():
        h.worker.request_release()
        h.thread.join(5)


def failing(times: int, then: Callable[..., Any], error: Exception = DOWN) -> Callable[..., Any]:
    """``then``, after raising ``error`` ``times`` times."""
    left = [times]

    def write(*args: Any, **kwargs: Any) -> Any:
        if left[0] > 0:
            left[0] -= 1
            raise error
        return then(*args, **kwargs)

    return write


def test_backoff_doubles_from_50_ms_to_a_1_s_cap_with_jitter() -> None:
    top = backoff(rng=lambda: 1.0)
    assert [round(next(top), 3) for _ in range(7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    bottom = backoff(rng=lambda: 0.0)
    assert [round(next(bottom), 3) for _ in range(3)] == [0.025, 0.05, 0.1]


def test_the_lease_bound_is_never_later_than_the_database_s_expiry() -> None:
    assert lease_bound(100.0, 6.0) == pytest.approx(105.4)  # a tenth of V off ...
    assert lease_bound(100.0, 30.0) == pytest.approx(129.0)  # ... 1 s at most


def retrying(**kwargs: Any) -> tuple[RetryingWrite, list[str]]:
    failures: list[str] = []
    retry = RetryingWrite(
        "settle",
        "job-1",
        stop=kwargs.pop("stop", threading.Event()),
        on_failure=failures.append,
        lease_until=lambda: float("inf"),
        **kwargs,
    )
    return retry, failures


def test_a_write_is_retried_until_the_store_answers() -> None:
    retry, failures = retrying()
    assert retry.run(failing(3, lambda: "done")) == "done"
    assert retry.failures == 3
    assert len(failures) == 3
    assert all("connection refused" in f for f in failures)


def test_lease_lost_and_other_errors_end_the_retries_at_once() -> None:
    retry, failures = retrying()
    with pytest.raises(LeaseLost):
        retry.run(failing(1, lambda: None, LeaseLost("taken")))
    with pytest.raises(ValueError, match="bad result"):
        retry.run(failing(1, lambda: None, ValueError("bad result")))
    assert failures == []


def test_a_release_or_the_bound_stops_the_retries() -> None:
    stop = threading.Event()
    stop.set()
    retry, _ = retrying(stop=stop)
    with pytest.raises(StoreUnavailable):
        retry.run(failing(5, lambda: None))
    assert retry.failures == 1
    bounded, _ = retrying(until=lambda: 0.0)
    with pytest.raises(StoreUnavailable):
        bounded.run(failing(5, lambda: None))
    assert bounded.failures == 1


def test_an_ack_that_fails_while_the_store_is_down_lands_when_it_is_back(
    harness: Harness,
) -> None:
    harness.queue.ack = failing(4, harness.queue.ack)  # type: ignore[method-assign]

    @harness.app.task
    def once() -> str:
        harness.log.append("ran")
        return "ok"

    job_id = once.enqueue()
    harness.start()
    wait_until(lambda: harness.state(job_id) == "succeeded", timeout=10)
    assert harness.log == ["ran"]
    assert harness.outcomes() == ["succeeded"]
    down = [e for e in harness.events.of_type(StoreHealth) if not e.ok]
    assert down, "not ready while the settle was failing"
    assert "settle failed" in down[0].reason, down


def test_a_settle_retried_into_a_lost_lease_writes_nothing(harness: Harness) -> None:
    calls = [0]

    def ack(*args: Any) -> None:
        calls[0] += 1
        if calls[0] <= 2:
            raise DOWN
        raise LeaseLost("another worker took the job")  # what the fence says once it is back

    harness.queue.ack = ack  # type: ignore[method-assign]

    @harness.app.task
    def once() -> None:
        harness.log.append("ran")

    once.enqueue()
    harness.start()
    wait_until(lambda: harness.outcomes() == ["lease_lost"], timeout=10)
    assert calls[0] == 3  # two retries, then the fence's answer ends it
    assert harness.log == ["ran"]


def test_a_checkpoint_that_fails_while_the_store_is_down_is_retried(harness: Harness) -> None:
    harness.queue.save_checkpoint = failing(  # type: ignore[method-assign]
        2, harness.queue.save_checkpoint
    )

    @harness.app.task
    def steps() -> None:
        current_job().save_checkpoint({"done": 1}, force=True)
        harness.log.append("saved")

    job_id = steps.enqueue()
    harness.start()
    wait_until(lambda: harness.state(job_id) == "succeeded", timeout=10)
    assert harness.log == ["saved"]


def test_a_store_that_fails_from_the_start_is_logged(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    def down() -> Any:
        raise DOWN

    harness.queue.health = down  # type: ignore[method-assign]
    caplog.set_level(logging.WARNING, logger="workerkit.engines.sql.worker")
    harness.start()
    wait_until(lambda: bool(harness.events.of_type(StoreHealth)), timeout=5)
    wait_until(lambda: any(getattr(r, "event", "") == "store_health" for r in caplog.records))
    record = next(r for r in caplog.records if getattr(r, "event", "") == "store_health")
    assert record.levelno == logging.WARNING
    assert "StoreUnavailable" in record.reason  # type: ignore[attr-defined]


def test_a_write_told_to_try_once_makes_one_attempt_against_a_store_that_stays_down() -> None:
    retry, failures = retrying(once=True)
    attempts = [0]

    def down() -> None:
        attempts[0] += 1
        raise DOWN

    with pytest.raises(StoreUnavailable):
        retry.run(down)
    assert attempts[0] == 1
    assert len(failures) == 1


def test_a_timeout_while_the_store_is_down_is_settled_once_by_the_main_thread() -> None:
    """The main thread must not retry a settle: it would hold the job's lock, leave the
    timed-out thread running and every other deadline unenforced until a release."""
    harness = Harness(job_timeout=0.3)
    calls = [0]

    def down(*args: Any) -> None:
        calls[0] += 1
        raise DOWN

    harness.queue.retry = down  # type: ignore[method-assign]
    harness.queue.fail = down  # type: ignore[method-assign]
    interrupted = threading.Event()

    @harness.app.task
    def forever() -> None:
        try:
            while True:
                threading.Event().wait(0.01)
        except BaseException:
            interrupted.set()
            raise

    forever.enqueue()
    worker = harness.start()
    try:
        wait_until(lambda: harness.outcomes() == ["lease_lost"], timeout=5)
        wait_until(interrupted.is_set, timeout=5)
        assert calls[0] == 1  # one attempt, left to the lease
    finally:
        worker.request_release()
        harness.join()


def test_the_queue_bounds_its_postgresql_connects_and_the_grace_covers_them() -> None:
    queue = SqlQueue("postgresql+psycopg://u:p@127.0.0.1:1/db")  # constructing never connects
    assert queue.connect_timeout == 3
    assert recovery_grace(queue.connect_timeout) == 3 + RETRY_MAX + LANDING_MARGIN
    longer = SqlQueue("postgresql+psycopg://u:p@127.0.0.1:1/db?connect_timeout=10")
    assert recovery_grace(longer.connect_timeout) == 10 + RETRY_MAX + LANDING_MARGIN


def test_a_settle_retried_through_a_partition_lands_within_the_grace_of_the_return() -> None:
    """The holder's side of the pause: a retry asleep or hung in a connect (the host does not
    answer, so each attempt takes the whole connect timeout) lands within recovery_grace."""
    connect_timeout = 1.5
    back_at = time.monotonic() + 2.0

    def write() -> float:
        if time.monotonic() < back_at:
            time.sleep(connect_timeout)  # a connect to an unreachable host, then its timeout
            raise DOWN
        return time.monotonic()

    retry, _ = retrying()
    landed = retry.run(write)
    assert retry.failures >= 2
    assert landed - back_at <= recovery_grace(connect_timeout)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_claims_pause_after_an_outage_long_enough_to_end_a_lease() -> None:
    clock = Clock()
    pause = ClaimPause(grace=5.0, threshold=2.0, clock=clock)
    pause.store_back(down_since=clock.now - 1.9)  # shorter than H: no lease ran out
    assert pause.left() == 0.0
    pause.store_back(down_since=clock.now - 2.0)
    assert pause.left() == 5.0
    clock.now += 4.9
    assert not pause.allows(claim_sent=clock.now)
    clock.now += 0.1
    assert pause.allows(claim_sent=clock.now)


def test_a_claim_in_flight_is_held_back_by_a_pause_that_began_meanwhile() -> None:
    clock = Clock()
    pause = ClaimPause(grace=5.0, threshold=2.0, clock=clock)
    sent = clock.now  # the claim starts while all is well ...
    clock.now += 0.5
    pause.store_back(down_since=clock.now - 3.0)  # ... the health check then saw an outage end
    assert not pause.allows(sent)


def test_a_claim_that_itself_waited_out_an_outage_claims_nothing_and_pauses() -> None:
    clock = Clock()
    pause = ClaimPause(grace=5.0, threshold=2.0, clock=clock)
    sent = clock.now
    clock.now += 2.0  # blocked in a connect, or behind SQLite's write lock
    assert not pause.allows(sent)
    assert pause.left() == 5.0


def test_the_worker_asks_its_pause_inside_each_claim_of_its_sql_queue() -> None:
    settings = Settings(database_url="postgresql+psycopg://u:p@127.0.0.1:1/db")
    queue = SqlQueue(settings=settings)
    NativeWorker(App(backend=queue, settings=settings), settings)
    assert queue.claim_gate is not None
    assert queue.claim_gate() is False  # not ready yet (no health check passed): no claim
