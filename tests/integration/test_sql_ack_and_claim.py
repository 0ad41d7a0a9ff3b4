"""Acks folded into the next claim (``SqlQueue.ack_and_claim``) keep the fence of ``ack``.

On SQLite and PostgreSQL: one write settles the finished jobs and claims the next; an ack whose
lease token is stale (the lease ran out and another worker claimed the job) matches nothing and
writes nothing, in the same batch as acks that land; a lease that ran out with nobody claiming
it is still its attempt's, and the statement's own claim does not take it from under the ack;
nor a stale ack's job put back to ready; a later round's failure still reports the acks; a
fetcher that dies mid-claim hands the acks back to their job threads.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from tests.support.native_worker import Harness, wait_until
from workerkit.engines.base import Delivery, NewJob
from workerkit.engines.sql import SqlQueue, upgrade
from workerkit.engines.sql.claim import Ack
from workerkit.engines.sql.schema import db_now
from workerkit.errors import StoreError
from workerkit.events import JobStarted
from workerkit.settings import Settings

SHORT_LEASE = 0.5
QUEUES = ["default"]


@pytest.fixture
def url(database_url: str) -> str:
    if database_url.startswith("sqlite"):
        upgrade(database_url)
    return database_url


@pytest.fixture
def opened() -> Iterator[list[SqlQueue]]:
    queues: list[SqlQueue] = []
    yield queues
    for queue in queues:
        queue.close()


def _queue(url: str, opened: list[SqlQueue], lease: float = 60.0) -> SqlQueue:
    queue = SqlQueue(url, settings=Settings(visibility_timeout=lease))
    opened.append(queue)
    return queue


def _enqueue(queue: SqlQueue, count: int) -> list[str]:
    ids = [f"job-{i}-{uuid.uuid4().hex[:6]}" for i in range(count)]
    for i, job_id in enumerate(ids):
        # run_at in order, so claims take them in this order
        assert queue.enqueue(NewJob(job_id, "t", "default", "[[], {}]", 3, time.time() - 10 + i))
    return ids


def _ack(delivery: Delivery, result: object) -> Ack:
    return Ack(delivery.job_id, delivery.token, json.dumps(result))


def _expire(queue: SqlQueue, delivery: Delivery) -> None:
    assert delivery.lease_expires_at is not None
    deadline = time.monotonic() + 30
    while True:
        with queue.engine.connect() as conn:
            if float(conn.execute(sa.select(db_now())).scalar_one()) > delivery.lease_expires_at:
                return
        assert time.monotonic() < deadline, "the database clock did not pass the lease"
        time.sleep(0.05)


def test_acks_and_the_next_claim_in_one_write(url: str, opened: list[SqlQueue]) -> None:
    queue = _queue(url, opened)
    first, second, third = _enqueue(queue, 3)
    held = queue.claim(QUEUES, "w1", 2)
    assert [d.job_id for d in held] == [first, second]

    matched, claimed = queue.ack_and_claim(
        [_ack(held[0], {"n": 1}), _ack(held[1], [2])], QUEUES, "w1", 2
    )

    assert matched == [True, True]
    assert [d.job_id for d in claimed] == [third]
    for job_id, result in ((first, {"n": 1}), (second, [2])):
        job = queue.get_job(job_id)
        assert job is not None
        assert (job["state"], job["result"], job["lease_token"]) == ("succeeded", result, None)
    assert queue.get_job(third)["state"] == "running"  # type: ignore[index]


def test_a_stale_token_settles_nothing(url: str, opened: list[SqlQueue]) -> None:
    old = _queue(url, opened, lease=SHORT_LEASE)
    new = _queue(url, opened)
    stale_job, fresh_job = _enqueue(old, 2)
    stale, fresh = old.claim(QUEUES, "old", 2)
    _expire(old, stale)
    (taken,) = new.claim(QUEUES, "new", 1)  # the expired lease goes first
    assert taken.job_id == stale_job
    assert taken.token != stale.token
    assert fresh.job_id == fresh_job
    new.extend(taken)

    matched, claimed = old.ack_and_claim(
        [_ack(stale, "stale"), _ack(fresh, "fresh")], QUEUES, "old", 2
    )

    # the stale ack matched nothing and wrote nothing; the other one in its batch landed
    assert matched == [False, True]
    assert claimed == []
    job = new.get_job(stale_job)
    assert job is not None
    assert (job["state"], job["result"], job["lease_token"]) == ("running", None, taken.token)
    assert new.get_job(fresh_job)["result"] == "fresh"  # type: ignore[index]
    # the new owner's folded ack settles it
    assert new.ack_and_claim([_ack(taken, "new")], QUEUES, "new", 1) == ([True], [])
    assert new.get_job(stale_job)["result"] == "new"  # type: ignore[index]
    # and the stale token, sent again, still settles nothing
    assert old.ack_and_claim([_ack(stale, "again")], QUEUES, "old", 1) == ([False], [])
    assert new.get_job(stale_job)["result"] == "new"  # type: ignore[index]


def test_an_expired_lease_nobody_took_is_acked_not_claimed(
    url: str, opened: list[SqlQueue]
) -> None:
    queue = _queue(url, opened, lease=SHORT_LEASE)
    (job_id,) = _enqueue(queue, 1)
    (delivery,) = queue.claim(QUEUES, "w1", 1)
    _expire(queue, delivery)

    matched, claimed = queue.ack_and_claim([_ack(delivery, 7)], QUEUES, "w1", 1)

    assert (matched, claimed) == ([True], [])
    job = queue.get_job(job_id)
    assert job is not None
    assert (job["state"], job["result"], job["attempts"]) == ("succeeded", 7, 1)


def test_the_acks_are_written_when_the_gate_holds_the_claim_back(
    url: str, opened: list[SqlQueue]
) -> None:
    queue = _queue(url, opened)
    first, second = _enqueue(queue, 2)
    (delivery,) = queue.claim(QUEUES, "w1", 1)
    queue.claim_gate = lambda: False

    assert queue.ack_and_claim([_ack(delivery, None)], QUEUES, "w1", 1) == ([True], [])
    assert queue.get_job(first)["state"] == "succeeded"  # type: ignore[index]
    assert queue.get_job(second)["state"] == "ready"  # type: ignore[index]


def test_a_stale_ack_s_job_put_back_to_ready_is_not_claimed_by_the_same_write(
    url: str, opened: list[SqlQueue]
) -> None:
    # Our lease on X ran out; another worker claimed X and put it back (a drain). Our ack of X
    # matches nothing, and the same write must not claim X: our old attempt's thread has not
    # ended yet, and a new attempt beside it would be the job run twice in this worker.
    old = _queue(url, opened, lease=SHORT_LEASE)
    new = _queue(url, opened)
    stale_job, other_job = _enqueue(old, 2)
    (stale,) = old.claim(QUEUES, "old", 1)
    _expire(old, stale)
    (taken,) = new.claim(QUEUES, "new", 1)
    assert taken.job_id == stale_job
    new.release(taken)
    assert new.get_job(stale_job)["state"] == "ready"  # type: ignore[index]

    matched, claimed = old.ack_and_claim([_ack(stale, "stale")], QUEUES, "old", 2)

    assert matched == [False]
    assert [d.job_id for d in claimed] == [other_job]
    assert new.get_job(stale_job)["state"] == "ready"  # type: ignore[index]
    # the next claim (no ack of X) takes it, as any ready job
    assert [d.job_id for d in old.claim(QUEUES, "old", 1)] == [stale_job]


def test_a_later_round_failing_after_the_acks_were_written_reports_them(
    url: str, opened: list[SqlQueue]
) -> None:
    # Round 1 writes the ack and fails a crash-looped job (no attempts left), so a second round
    # claims; that round fails. The ack is written: the caller is told so, not handed an error
    # (its job thread would write the ack again into the fence, and report the job lost).
    queue = _queue(url, opened)
    short = _queue(url, opened, lease=SHORT_LEASE)
    looped = f"looped-{uuid.uuid4().hex[:6]}"
    assert short.enqueue(NewJob(looped, "t", "default", "[[], {}]", 1, time.time() - 20))
    (mine,) = _enqueue(queue, 1)
    (crashed,) = short.claim(QUEUES, "gone", 1)
    assert crashed.job_id == looped
    (held,) = queue.claim(QUEUES, "w1", 1)
    _expire(short, crashed)
    rounds: list[int] = []

    def gate() -> bool:
        rounds.append(1)
        if len(rounds) > 1:
            raise StoreError("the store went away")
        return True

    queue.claim_gate = gate

    assert queue.ack_and_claim([_ack(held, "done")], QUEUES, "w1", 1) == ([True], [])
    assert len(rounds) == 2
    assert queue.get_job(mine)["state"] == "succeeded"  # type: ignore[index]
    assert queue.get_job(looped)["state"] == "failed"  # type: ignore[index]


class _FetcherKilled(BaseException):
    """Not an Exception: what the fetcher's own handling does not catch."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_fetcher_ended_by_a_base_exception_hands_the_acks_back(
    url: str, opened: list[SqlQueue], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The job's ack is taken for the fetcher's claim; the fetcher dies in that claim. The job
    # thread must not wait for the batch forever (holding its settle lock): it acks alone.
    queue = _queue(url, opened)
    harness = Harness(queue, concurrency=1)
    release = threading.Event()
    killed: list[int] = []

    def ack_and_claim(*args: object, **kwargs: object) -> object:
        killed.append(1)
        raise _FetcherKilled

    monkeypatch.setattr(queue, "ack_and_claim", ack_and_claim)

    @harness.app.task
    def waits() -> int:
        release.wait(10)  # the fetcher is waiting for this slot by now, its fold open
        return 1

    ids = [waits.enqueue() for _ in range(3)]
    worker = harness.start()
    # At concurrency 1, the fetcher then waits for the slot with its fold open, so the job's ack
    # goes with the claim (should it not have opened yet, the next job's ack does).
    wait_until(lambda: bool(harness.events.of_type(JobStarted)))
    release.set()
    try:
        wait_until(lambda: killed == [1])
        started = {e.job_id for e in harness.events.of_type(JobStarted)}
        wait_until(lambda: len(harness.outcomes()) == len(started))
        assert set(harness.outcomes()) == {"succeeded"}
        assert all(harness.state(i) == "succeeded" for i in started)
        assert all(harness.state(i) == "ready" for i in set(ids) - started)  # no fetcher
    finally:
        worker.request_release()
        harness.join()
