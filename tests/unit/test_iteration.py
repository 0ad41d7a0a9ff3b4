"""Iteration helpers: resume from the cursor, save it (F, every N), release on a stop request."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

import workerkit
from tests.support.native_worker import Harness, wait_until
from workerkit.errors import ConfigurationError, JobError, LeaseLost, NoCurrentJob, ReleaseJob
from workerkit.job import JobContext, current_job
from workerkit.testing import ManualClock


def numbers(total: int) -> Any:
    """``fetch`` over the integers 0..total-1; the cursor of ``i`` is ``i + 1``."""

    def fetch(after: int, limit: int) -> list[int]:
        return list(range(after, min(after + limit, total)))

    return fetch


def after_(i: int) -> int:
    return i + 1


def context(saved: list[Any], clock: ManualClock | None = None, **kwargs: Any) -> JobContext:
    options: dict[str, Any] = {"checkpoint_interval": 5, **kwargs}
    return JobContext(
        job_id="j1",
        task="t",
        queue="default",
        attempt=1,
        save=saved.append,
        clock=clock or ManualClock(start=0),
        **options,
    )


# --- checkpointed ------------------------------------------------------------------------


def test_checkpointed_yields_every_item_in_pages_and_resumes_from_the_checkpoint() -> None:
    job = context([], checkpoint=5)
    with job.activate():
        items = list(workerkit.checkpointed(numbers(12), cursor_of=after_, start=0, page_size=4))
    assert items == [5, 6, 7, 8, 9, 10, 11]
    assert job.checkpoint == 12


def test_cursor_is_written_every_n_items_and_every_f_seconds_in_between() -> None:
    saved: list[Any] = []
    clock = ManualClock(start=0)
    job = context(saved, clock)
    with job.activate():
        for i in workerkit.checkpointed(numbers(10), cursor_of=after_, start=0, every=4):
            if i == 5:
                clock.advance(5)  # F passed while item 5 was being done
    # every 4 items (4, 8) and, in between, once F had passed (after item 5: cursor 6)
    assert saved == [4, 6, 8]
    assert job.checkpoint == 10  # kept, written by a later flush or release (or dropped by ack)


def test_stop_request_saves_the_last_finished_cursor_and_releases_before_the_next_item() -> None:
    saved: list[Any] = []
    job = context(saved)
    done: list[int] = []

    def run() -> None:
        for i in workerkit.checkpointed(numbers(100), cursor_of=after_, start=0):
            done.append(i)
            if i == 3:
                job.request_stop()  # the drain deadline passes while item 3 is being done

    with job.activate(), pytest.raises(ReleaseJob):
        run()
    assert done == [0, 1, 2, 3]
    assert saved[-1] == 4  # items 0..3 are done: resume at 4, nothing done twice


def test_key_keeps_the_cursor_beside_the_other_checkpoint_keys() -> None:
    saved: list[Any] = []
    job = context(saved, checkpoint={"phase": "copy", "rows": 2})

    def run() -> None:
        for i in workerkit.checkpointed(numbers(10), cursor_of=after_, start=0, key="rows"):
            assert i >= 2
            if i == 4:
                job.request_stop()

    with job.activate(), pytest.raises(ReleaseJob):
        run()
    assert saved[-1] == {"phase": "copy", "rows": 5}


def test_fetch_that_returns_the_same_cursor_again_fails_instead_of_looping() -> None:
    def stuck(after: int, limit: int) -> list[int]:
        return [after]

    job = context([])
    with job.activate(), pytest.raises(JobError, match="only items after the cursor"):
        for _ in workerkit.checkpointed(stuck, cursor_of=lambda i: i, start=0):
            pass


def test_helpers_outside_a_job_raise_no_current_job_at_once() -> None:
    with pytest.raises(NoCurrentJob):
        workerkit.checkpointed(numbers(3), cursor_of=after_, start=0)
    with pytest.raises(NoCurrentJob):
        workerkit.batches(numbers(3), cursor_of=after_, start=0, size=2)
    with pytest.raises(ValueError, match="size must be at least 1"):
        workerkit.batches(numbers(3), cursor_of=after_, start=0, size=0)


# --- batches -----------------------------------------------------------------------------


def test_plain_batches_save_each_finished_batch_and_release_with_the_last_one() -> None:
    saved: list[Any] = []
    job = context(saved, checkpoint_interval=0)
    seen: list[tuple[int, int, list[int]]] = []

    def run() -> None:
        for batch in workerkit.batches(numbers(10), cursor_of=after_, start=0, size=4):
            seen.append((batch.after, batch.cursor, list(batch)))
            if len(seen) == 2:
                job.request_stop()

    with job.activate(), pytest.raises(ReleaseJob):
        run()
    assert seen == [(0, 4, [0, 1, 2, 3]), (4, 8, [4, 5, 6, 7])]
    assert saved == [4, 8, 8]  # after each batch (F = 0), and once more at the release


class FakeTransactionalSink:
    """A transactional sink over a pretend database: a transaction is a list of writes."""

    def __init__(self) -> None:
        self.plain: list[Any] = []
        self.committed: list[list[Any]] = []
        self.lease_lost = False

    def __call__(self, state: Any) -> None:
        self.plain.append(state)

    def save_in(self, connection: Any, state: Any) -> None:
        if self.lease_lost:
            raise LeaseLost
        connection.append(("checkpoint", state))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[list[Any]]:
        writes: list[Any] = []
        yield writes  # an exception here is a rollback: the writes are dropped
        self.committed.append(writes)


def test_batch_transaction_commits_the_writes_with_the_cursor_and_writes_nothing_else() -> None:
    sink = FakeTransactionalSink()
    job = JobContext(job_id="j", task="t", queue="q", attempt=1, save=sink, checkpoint_interval=0)
    with job.activate():
        for batch in workerkit.batches(numbers(5), cursor_of=after_, start=0, size=2):
            with batch.transaction() as conn:
                conn.extend(("row", i) for i in batch)
    assert sink.committed == [
        [("row", 0), ("row", 1), ("checkpoint", 2)],
        [("row", 2), ("row", 3), ("checkpoint", 4)],
        [("row", 4), ("checkpoint", 5)],
    ]
    assert sink.plain == []
    assert job.checkpoint == 5


def test_a_batch_whose_transaction_rolled_back_is_fetched_again() -> None:
    sink = FakeTransactionalSink()
    job = JobContext(job_id="j", task="t", queue="q", attempt=1, save=sink)
    tries = 0
    with job.activate():
        for batch in workerkit.batches(numbers(4), cursor_of=after_, start=0, size=2):
            try:
                with batch.transaction() as conn:
                    conn.extend(("row", i) for i in batch)
                    if batch.after == 2 and tries == 0:
                        tries += 1
                        raise RuntimeError("deadlock detected")  # retried by the caller
            except RuntimeError:
                continue
    assert [writes[-1] for writes in sink.committed] == [("checkpoint", 2), ("checkpoint", 4)]
    assert sink.committed[1] == [("row", 2), ("row", 3), ("checkpoint", 4)]


def test_a_batch_commits_in_one_transaction_only() -> None:
    sink = FakeTransactionalSink()
    job = JobContext(job_id="j", task="t", queue="q", attempt=1, save=sink)
    with job.activate():
        batch = next(workerkit.batches(numbers(4), cursor_of=after_, start=0, size=2))
        with batch.transaction() as conn:
            conn.append(("row", 0))
        with pytest.raises(JobError, match="already committed"), batch.transaction():
            pass
    assert sink.committed == [[("row", 0), ("checkpoint", 2)]]


def test_lost_lease_in_a_batch_transaction_rolls_the_batch_back_and_stops_the_job() -> None:
    sink = FakeTransactionalSink()
    job = JobContext(job_id="j", task="t", queue="q", attempt=1, save=sink)

    def run() -> None:
        for batch in workerkit.batches(numbers(10), cursor_of=after_, start=0, size=2):
            with batch.transaction() as conn:
                conn.append(("row", batch.after))
                sink.lease_lost = batch.after == 2

    with job.activate(), pytest.raises(LeaseLost):
        run()
    assert [writes[-1] for writes in sink.committed] == [("checkpoint", 2)]
    assert job.lease_lost
    assert job.stop_requested


def test_transactional_checkpoint_without_a_database_queue_says_what_is_needed() -> None:
    job = context([])
    with pytest.raises(ConfigurationError, match="SQL queue"):
        job.save_checkpoint(1, connection=object())
    with pytest.raises(ConfigurationError, match="SQL queue"), job.transaction():
        pass


# --- under the native worker -------------------------------------------------------------


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    if h.worker is not None and h.thread is not None and h.thread.is_alive():
        h.worker.request_release()
        h.thread.join(5)


def test_checkpointed_job_released_at_a_stop_request_resumes_without_redoing_an_item(
    harness: Harness,
) -> None:
    total = 2000
    processed: list[int] = []

    @harness.app.task(checkpointed=True)
    def walk(n: int) -> int:
        for i in workerkit.checkpointed(numbers(n), cursor_of=after_, start=0, page_size=100):
            processed.append(i)
            time.sleep(0.0005)
        return current_job().attempt

    job_id = walk.enqueue(total)
    worker = harness.start()
    wait_until(lambda: len(processed) > 200)
    worker.stop_fetching()
    harness.events.command("request_stop")
    assert harness.join() == 0
    job = harness.queue.get_job(job_id)
    assert job is not None
    assert (job["state"], job["attempts"]) == ("ready", 0)
    stopped_at = len(processed)
    assert job["checkpoint"] == stopped_at

    harness.start()
    wait_until(lambda: harness.state(job_id) == "succeeded")
    assert processed == list(range(total))  # each item exactly once, across two attempts
    assert harness.outcomes() == ["released", "succeeded"]
    finished = harness.queue.get_job(job_id)
    assert finished is not None
    assert finished["checkpoint"] is None  # dropped when the job completed


def test_batch_transaction_on_the_in_memory_queue_fails_the_job_with_the_reason(
    harness: Harness,
) -> None:
    @harness.app.task(max_attempts=1)
    def needs_a_database() -> None:
        for batch in workerkit.batches(numbers(4), cursor_of=after_, start=0, size=2):
            with batch.transaction():
                pass

    job_id = needs_a_database.enqueue()
    harness.start()
    wait_until(lambda: harness.state(job_id) == "failed")
    job = harness.queue.get_job(job_id)
    assert job is not None
    reason = job["last_error"]
    assert "InMemoryQueue cannot write a checkpoint inside a database transaction" in reason
