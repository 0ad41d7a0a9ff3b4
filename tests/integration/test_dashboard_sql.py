"""The sql engine's dashboard source on real SQLite and PostgreSQL.

Summaries per queue, keyset pages walked to the end (every job once), a job's detail, search by
id, task and idempotency key, the fenced actions and their refusals when the job moved on
between the page and the action, pause/resume (and the NOTIFY that wakes idle PostgreSQL
workers), and the workers' presences.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from tests.support.native_worker import Harness, wait_until
from workerkit.dashboard.model import ActionRefused, JobQuery, JobState, StaleAction
from workerkit.engines.base import NewJob
from workerkit.engines.presence import Presence
from workerkit.engines.sql import SqlQueue, create_engine_for, upgrade
from workerkit.engines.sql.dashboard import SqlDashboardSource, open_source, presence_store
from workerkit.engines.sql.pauses import worker_filter
from workerkit.engines.sql.schema import jobs, workers
from workerkit.errors import ConfigurationError
from workerkit.idempotency.sql import SqlIdempotencyStore
from workerkit.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def queue(database_url: str) -> Iterator[SqlQueue]:
    upgrade(database_url)
    queue = SqlQueue(database_url, settings=Settings())
    try:
        yield queue
    finally:
        queue.close()


@pytest.fixture
def source(queue: SqlQueue) -> Iterator[SqlDashboardSource]:
    url = queue.url.render_as_string(hide_password=False)
    source = open_source(Settings().replace(database_url=url))
    try:
        yield source
    finally:
        source.close()


def _job(job_id: str, queue: str = "a", task: str = "t", run_at: float | None = None) -> NewJob:
    return NewJob(job_id, task, queue, '{"args":[],"kwargs":{}}', max_attempts=3, run_at=run_at)


def _walk(source: SqlDashboardSource, state: JobState, limit: int, **filters: str) -> list[str]:
    seen: list[str] = []
    cursor = None
    for _ in range(100):
        page = source.jobs(JobQuery(state=state, cursor=cursor, limit=limit, **filters))
        seen.extend(row.id for row in page.rows)
        assert all(row.state == state for row in page.rows)
        if page.next_cursor is None:
            return seen
        cursor = page.next_cursor
    raise AssertionError("pages never ended")


def _row(queue: SqlQueue, job_id: str) -> dict[str, object] | None:
    return queue.get_job(job_id)


def test_summaries_count_each_state_per_queue(queue: SqlQueue, source: SqlDashboardSource) -> None:
    far = time.time() + 3600
    queue.enqueue_many([_job(f"a{i}") for i in range(4)])
    queue.enqueue_many([_job(f"s{i}", run_at=far) for i in range(2)])
    queue.enqueue_many([_job("b0", "b"), _job("b1", "b"), _job("b2", "b")])
    (running,) = queue.claim(["a"], "w1", 1)
    done, failed = queue.claim(["b"], "w1", 2)
    queue.ack(done, None)
    queue.fail(failed, "boom")
    source.pause_queue("idle", "tester")

    summaries = {summary.name: summary for summary in source.queues()}

    a, b, idle = summaries["a"], summaries["b"], summaries["idle"]
    assert (a.waiting, a.scheduled, a.running, a.failed, a.finished) == (3, 2, 1, 0, None)
    assert a.oldest_waiting_age is not None
    assert 0 <= a.oldest_waiting_age < 60
    assert (b.waiting, b.scheduled, b.running, b.failed, b.finished) == (1, 0, 0, 1, None)
    assert (idle.waiting, idle.paused, a.paused) == (0, True, False)
    assert running.job_id.startswith("a")


def test_pages_walk_every_job_exactly_once(queue: SqlQueue, source: SqlDashboardSource) -> None:
    # enqueue_many gives a batch one run_at: the cursor's id breaks the ties.
    queue.enqueue_many([_job(f"w{i:02d}") for i in range(23)])
    queue.enqueue_many([_job(f"x{i:02d}", "b", task="other") for i in range(6)])
    queue.enqueue_many([_job(f"f{i:02d}", "c") for i in range(12)])
    claimed = queue.claim(["c"], "w1", 12)
    for delivery in claimed[:7]:
        queue.ack(delivery, {"n": 1})
    for delivery in claimed[7:]:
        queue.fail(delivery, "Traceback...\nValueError: nope")

    waiting = _walk(source, "waiting", 5)
    assert sorted(waiting) == sorted(
        [f"w{i:02d}" for i in range(23)] + [f"x{i:02d}" for i in range(6)]
    )
    assert len(set(waiting)) == len(waiting)
    assert _walk(source, "waiting", 4, queue="a") == sorted(f"w{i:02d}" for i in range(23))
    assert sorted(_walk(source, "waiting", 3, task="other")) == [f"x{i:02d}" for i in range(6)]
    finished = _walk(source, "finished", 2)
    assert sorted(finished) == sorted(d.job_id for d in claimed[:7])
    assert _walk(source, "finished", 2, queue="a") == []
    failed = _walk(source, "failed", 2, queue="c")
    assert sorted(failed) == sorted(d.job_id for d in claimed[7:])
    first = source.jobs(JobQuery(state="failed", limit=2))
    assert first.total == 5
    assert first.rows[0].error == "ValueError: nope"
    assert source.jobs(JobQuery(state="running", limit=2)).total == 0
    assert source.jobs(JobQuery(state="waiting", limit=2)).total is None  # queues() counts them
    assert source.jobs(JobQuery(state="finished", limit=2)).total is None


def test_detail_of_a_job(queue: SqlQueue, source: SqlDashboardSource) -> None:
    queue.enqueue(_job("d1"))
    (delivery,) = queue.claim(["a"], "worker-9", 1)
    queue.save_checkpoint(delivery, {"page": 7})

    detail = source.job("d1")

    assert detail is not None
    row = detail.row
    assert (row.state, row.attempt, row.max_attempts, row.worker) == ("running", 1, 3, "worker-9")
    assert row.has_checkpoint
    assert row.lease_expires_at is not None
    assert detail.checkpoint == '{"page":7}'
    assert detail.args == '{"args":[],"kwargs":{}}'
    assert source.job("nope") is None


def test_a_large_payload_is_cut_by_the_database(
    queue: SqlQueue, source: SqlDashboardSource
) -> None:
    """A 5 MB payload: the detail's statement takes the first 64 KiB and the length in SQL
    (substr, length), so the rest never leaves the database; the note gives the full size."""
    size = 5 * 1024 * 1024
    payload = '{"args":["' + "p" * size + '"],"kwargs":{}}'
    queue.enqueue(NewJob("huge", "t", "a", payload, max_attempts=3))
    statements: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(statement)

    sa.event.listen(sa.Engine, "before_cursor_execute", seen)
    try:
        detail = source.job("huge")
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", seen)
    assert detail is not None
    assert detail.args is not None
    assert len(detail.args) == 64 * 1024
    assert detail.extra["note"] == f"arguments cut at 64 KiB of {len(payload)} characters"
    [read] = [s for s in statements if "workerkit_jobs.payload" in s]
    assert "substr(workerkit_jobs.payload" in read
    assert "length(workerkit_jobs.payload)" in read
    assert (detail.checkpoint, detail.result) == (None, None)


def test_search_by_id_task_and_idempotency_key(queue: SqlQueue, source: SqlDashboardSource) -> None:
    queue.enqueue_many([_job("k1", task="mail"), _job("k2", task="mail"), _job("k3", task="sms")])
    (delivery,) = queue.claim(["a"], "w1", 1)
    queue.fail(delivery, "boom")  # k1: failed, still found by task
    store = SqlIdempotencyStore(queue.engine)
    store.claim("order-42", "fp", in_progress_expiry=60)

    assert [row.id for row in source.search("k3").jobs] == ["k3"]
    assert sorted(row.id for row in source.search("mail").jobs) == ["k1", "k2"]
    (record,) = source.search("order-42").idempotency
    assert (record.key, record.state) == ("order-42", "in_progress")
    assert source.search("nothing").jobs == ()


def _failed_job(queue: SqlQueue, job_id: str) -> None:
    queue.enqueue(_job(job_id))
    (delivery,) = queue.claim(["a"], "w1", 1)
    queue.fail(delivery, "boom")


def _version(source: SqlDashboardSource, job_id: str) -> str:
    detail = source.job(job_id)
    assert detail is not None
    return detail.row.version


def _actions(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [
        (record.__dict__["action"], record.__dict__["outcome"])
        for record in caplog.records
        if record.__dict__.get("event") == "dashboard_action"
    ]


def test_retry_discard_and_cancel(
    queue: SqlQueue, source: SqlDashboardSource, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="workerkit.dashboard")
    _failed_job(queue, "r1")
    _failed_job(queue, "r2")
    queue.enqueue(_job("c1", run_at=time.time() + 3600))

    source.retry_failed("r1", _version(source, "r1"), "alice")
    source.discard_failed("r2", _version(source, "r2"), "alice")
    source.cancel_waiting("c1", _version(source, "c1"), "alice")

    r1 = queue.get_job("r1")
    assert r1 is not None
    assert (r1["state"], r1["attempts"], r1["last_error"]) == (
        "ready",
        0,
        "boom",
    )
    assert [d.job_id for d in queue.claim(["a"], "w2", 5)] == ["r1"]  # due now
    assert queue.get_job("r2") is None
    c1 = queue.get_job("c1")
    assert c1 is not None
    assert c1["state"] == "failed"
    assert c1["last_error"] == "cancelled by alice from the dashboard"
    assert _actions(caplog) == [("retry", "done"), ("discard", "done"), ("cancel", "done")]


def test_an_action_on_a_job_that_moved_on_changes_nothing(
    queue: SqlQueue, source: SqlDashboardSource, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="workerkit.dashboard")
    _failed_job(queue, "m1")
    shown = _version(source, "m1")
    source.retry_failed("m1", shown, "bob")  # someone else retried it...
    (delivery,) = queue.claim(["a"], "w1", 1)
    queue.fail(delivery, "boom again")  # ...and it failed again: same state, newer version
    before = queue.get_job("m1")

    with pytest.raises(StaleAction, match=r"m1 changed since the page showed it \(now failed\)"):
        source.retry_failed("m1", shown, "alice")
    with pytest.raises(StaleAction):
        source.discard_failed("m1", shown, "alice")

    assert queue.get_job("m1") == before
    queue.enqueue(_job("m2"))
    waiting = _version(source, "m2")
    claimed = queue.claim(["a"], "w1", 1)
    assert [d.job_id for d in claimed] == ["m2"]
    with pytest.raises(StaleAction, match=r"now running"):
        source.cancel_waiting("m2", waiting, "alice")
    m2 = queue.get_job("m2")
    assert m2 is not None
    assert m2["state"] == "running"
    with pytest.raises(ActionRefused, match="only a failed job"):
        source.retry_failed("m2", waiting, "alice")  # the page showed it waiting
    with pytest.raises(ActionRefused, match="no such job"):
        source.discard_failed("ghost", shown, "alice")
    assert _actions(caplog)[1:] == [
        ("retry", "stale"),
        ("discard", "stale"),
        ("cancel", "stale"),
        ("retry", "refused"),
        ("discard", "refused"),
    ]


def test_pause_and_resume(queue: SqlQueue, source: SqlDashboardSource, database_url: str) -> None:
    pauses = worker_filter(queue, ["a", "b"])
    source.pause_queue("a", "alice")
    source.pause_queue("a", "alice")  # again: nothing changes
    store = presence_store(Settings().replace(database_url=database_url))
    try:
        assert store.paused_queues() == frozenset({"a"})
        assert pauses.active() == ["b"]
        assert pauses.idle_wait(5.0) == 1.0  # a paused queue: looks again within a second
        woken = threading.Event()
        if queue.dialect == "postgresql":
            queue.wait_for_jobs(["a"], 0.01)  # listening from now on
            time.sleep(0.5)  # the LISTEN connection comes up

            def wait() -> None:
                queue.wait_for_jobs(["a"], 30)
                woken.set()

            threading.Thread(target=wait, daemon=True).start()
        source.resume_queue("a", "alice")
        assert store.paused_queues() == frozenset()
        assert not {s.name for s in source.queues() if s.paused}
        deadline = time.monotonic() + 10  # the worker's view is at most a second old
        while pauses.active() != ["a", "b"]:
            assert time.monotonic() < deadline, "the resume was never seen"
            time.sleep(0.05)
        assert pauses.idle_wait(5.0) == 5.0
        if queue.dialect == "postgresql":
            assert woken.wait(10), "the resume's NOTIFY did not wake the waiting worker"
    finally:
        store.close()


def test_presences_on_the_database_clock(
    queue: SqlQueue, source: SqlDashboardSource, database_url: str
) -> None:
    store = presence_store(Settings().replace(database_url=database_url))
    presence = Presence(
        worker_id="host:1:abc",
        hostname="host",
        pid=1,
        engine="sql",
        queues=("a", "mail"),
        concurrency=2,
        state="draining",
        started_at=1.0,
        heartbeat_at=2.0,  # the supervisor's clock: replaced by the database's
        ttl=15.0,
        drain_deadline=10.0,
        jobs=("j1",),
        counts={"a": {"succeeded": 3}},
    )
    engine = create_engine_for(database_url)
    try:
        with engine.begin() as conn:  # a worker gone for two days: pruned at the next publish
            conn.execute(
                sa.insert(workers).values(
                    worker_id="old", record="{}", state="ready", heartbeat_at=1.0
                )
            )
        store.publish(presence)
        (shown,) = source.workers()
        assert shown.worker_id == "host:1:abc"
        assert shown.jobs == ("j1",)
        assert shown.state == "draining"
        assert shown.drain_deadline == 10.0
        assert abs(shown.heartbeat_at - source.clock()) < 30
        assert "mail" in {s.name for s in source.queues()}
        store.remove("host:1:abc")
        assert source.workers() == []
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(jobs)).scalar_one() == 0
    finally:
        engine.dispose()
        store.close()


def test_a_database_without_the_dashboard_tables_is_refused_with_the_fix(
    blank_database_url: str,
) -> None:
    upgrade(blank_database_url, "0004")  # the release before the dashboard
    with pytest.raises(ConfigurationError, match="workerkit db upgrade"):
        open_source(Settings().replace(database_url=blank_database_url))


@pytest.mark.timeout(60)
def test_enqueues_to_a_paused_queue_do_not_wake_an_idle_worker(
    queue: SqlQueue, source: SqlDashboardSource
) -> None:
    """PostgreSQL: each enqueue NOTIFYs its queue; an idle worker listens only to the queues it
    claims from, so enqueues to a paused queue cost it no claim (at most the 1 s re-read's)."""
    if queue.dialect != "postgresql":
        pytest.skip("NOTIFY wake-ups: PostgreSQL only")
    source.pause_queue("paused", "alice")
    claims: list[list[str]] = []
    real_claim = queue.claim

    def counting_claim(queues: list[str], *args: object, **kwargs: object) -> object:
        claims.append(list(queues))
        return real_claim(queues, *args, **kwargs)  # type: ignore[arg-type]

    queue.claim = counting_claim  # type: ignore[method-assign]
    harness = Harness(queue, queues=("paused", "open"), poll_interval=30.0)
    worker = harness.start()
    try:
        wait_until(lambda: len(claims) >= 1, timeout=20)
        time.sleep(1.0)  # the LISTEN connection up, the first idle wait begun
        before = len(claims)
        for i in range(40):
            queue.enqueue(_job(f"p{i}", queue="paused"))
            time.sleep(0.05)
        time.sleep(0.5)
        during = len(claims) - before
        # 40 NOTIFYs in ~2.5 s: one claim each before the fix; now only the ~1 s re-reads.
        assert during <= 8, f"{during} claims for 40 enqueues to a paused queue"
        assert all("paused" not in queues for queues in claims)
        row = queue.get_job("p0")
        assert row is not None
        assert row["state"] == "ready"
    finally:
        worker.request_release()
        harness.join(20)
