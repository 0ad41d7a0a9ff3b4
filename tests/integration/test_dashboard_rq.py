"""The RQ engine's dashboard source on a real Redis, with jobs enqueued as RQ users enqueue them.

Workers run in burst mode in the test's own process (``work(burst=True)``); a running job is
seen from inside the job itself (it reads the dashboard while a real worker runs it).
"""

from __future__ import annotations

import logging
import pickle
import time
import zlib
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from rq import Queue
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer

from tests.support.rq_in_process import rq_worker_in_this_process
from workerkit.dashboard.model import ActionRefused, JobQuery, StaleAction
from workerkit.engines.presence import Presence
from workerkit.engines.redis_presence import PRESENCE_KEY
from workerkit.engines.rq import RqApp, SimpleWorker
from workerkit.engines.rq.dashboard import SEARCH_SCAN, open_source, presence_store
from workerkit.engines.rq.jobs import read_state
from workerkit.idempotency.redis import RedisIdempotencyStore
from workerkit.job import current_job
from workerkit.settings import Settings

if TYPE_CHECKING:
    import redis

    from workerkit.dashboard.model import DashboardSource, JobRow

MODULE = __name__
app = RqApp(modules=[MODULE])
seen: dict[str, Any] = {}


def add(a: int, b: int) -> int:
    return a + b


def big(size: int) -> str:
    return "r" * size


def boom(note: str) -> None:
    raise RuntimeError(f"boom {note}")


def look_while_running(redis_url: str) -> str:
    """Reads the dashboard from inside a job that a real worker is running."""
    current_job().save_checkpoint({"step": 3}, force=True)
    source = open_source(settings_for(redis_url))
    try:
        seen["detail"] = source.job(current_job().job_id)
        seen["queues"] = source.queues()
        seen["running"] = source.jobs(JobQuery(state="running"))
    finally:
        source.close()
    return "looked"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("WORKERKIT_RQ_SERIALIZER", raising=False)
    with rq_worker_in_this_process(monkeypatch):
        seen.clear()
        yield


@pytest.fixture
def source(redis_url: str) -> Iterator[DashboardSource]:
    opened = open_source(settings_for(redis_url))
    try:
        yield opened
    finally:
        opened.close()


def settings_for(redis_url: str) -> Settings:
    return Settings(engine="rq", redis_url=redis_url, app=f"{MODULE}:app")


def queue(client: redis.Redis[bytes], name: str = "default") -> Queue:
    return Queue(name, connection=client, serializer=JSONSerializer)


def run_burst(client: redis.Redis[bytes], redis_url: str, *queues: str) -> None:
    worker = SimpleWorker(
        list(queues or ["default"]), connection=client, app=app, settings=settings_for(redis_url)
    )
    worker.work(burst=True)


def all_pages(source: DashboardSource, query: JobQuery) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = query.cursor
    while True:
        page = source.jobs(JobQuery(query.state, query.queue, query.task, cursor, query.limit))
        pages.append([row.id for row in page.rows])
        cursor = page.next_cursor
        if cursor is None:
            return pages


def row(source: DashboardSource, job_id: str) -> JobRow:
    detail = source.job(job_id)
    assert detail is not None, job_id
    return detail.row


def actions(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, str, str]]:
    return [
        (r.action, getattr(r, "job_id", getattr(r, "queue", "")), r.actor, r.outcome)  # type: ignore[attr-defined]
        for r in caplog.records
        if getattr(r, "event", None) == "dashboard_action"
    ]


def test_queue_summaries_count_every_state_and_the_oldest_waiting_age(
    redis_client: redis.Redis[bytes], redis_url: str, source: DashboardSource
) -> None:
    work = queue(redis_client, "work")
    work.enqueue(f"{MODULE}.add", 1, 2, job_id="ok-1")
    work.enqueue(f"{MODULE}.boom", "x", job_id="bad-1")
    work.enqueue(f"{MODULE}.look_while_running", redis_url, job_id="looker")
    run_burst(redis_client, redis_url, "work")
    waiting = queue(redis_client, "default")
    for n in range(3):
        waiting.enqueue(f"{MODULE}.add", n, n, job_id=f"w-{n}")
    waiting.enqueue_in(timedelta(hours=1), f"{MODULE}.add", 9, 9, job_id="later")
    time.sleep(0.05)

    by_name = {summary.name: summary for summary in source.queues()}

    assert set(by_name) == {"default", "work"}
    default, work_summary = by_name["default"], by_name["work"]
    assert (default.waiting, default.scheduled, default.running) == (3, 1, 0)
    assert (default.failed, default.finished, default.paused) == (0, 0, False)
    assert default.oldest_waiting_age is not None
    assert 0.05 <= default.oldest_waiting_age < 30
    assert (work_summary.waiting, work_summary.failed, work_summary.finished) == (0, 1, 2)
    assert work_summary.oldest_waiting_age is None
    # Seen from inside the running job: the worker's StartedJobRegistry entry, with its lease.
    during = {summary.name: summary for summary in seen["queues"]}
    assert during["work"].running == 1
    [running] = seen["running"].rows
    assert (running.id, running.state, running.task) == (
        "looker",
        "running",
        f"{MODULE}.look_while_running",
    )
    assert running.attempt == 1
    assert running.worker is not None
    assert running.lease_expires_at is not None
    assert running.lease_expires_at > running.run_at
    assert running.has_checkpoint
    assert seen["detail"].checkpoint == '{"step": 3}'
    assert seen["detail"].extra["lease"].startswith("run:")


def test_pages_have_no_duplicates_nor_gaps_while_jobs_leave_between_them(
    redis_client: redis.Redis[bytes], redis_url: str, source: DashboardSource
) -> None:
    q = queue(redis_client)
    ids = [f"job-{n:03d}" for n in range(120)]
    for job_id in ids:
        q.enqueue(f"{MODULE}.add", 1, 1, job_id=job_id)

    first = source.jobs(JobQuery(state="waiting", queue="default", limit=50))
    assert [r.id for r in first.rows] == ids[:50]
    assert first.total == 120
    for _ in range(10):  # workers take the ten oldest meanwhile (the front of the list moves)
        redis_client.lpop("rq:queue:default")
    second = source.jobs(
        JobQuery(state="waiting", queue="default", cursor=first.next_cursor, limit=50)
    )
    assert [r.id for r in second.rows] == ids[50:100]
    last_shown = second.rows[-1].id
    redis_client.lrem("rq:queue:default", 0, last_shown)  # the cursor's own job leaves too
    third = source.jobs(
        JobQuery(state="waiting", queue="default", cursor=second.next_cursor, limit=50)
    )
    # Its entry gone, the next page starts after the last shown job still there.
    assert [r.id for r in third.rows] == ids[100:]
    assert third.next_cursor is None

    # A sorted set with ties (finished jobs, RQ's whole-second scores), newest first.
    redis_client.delete("rq:queue:default")
    for n in range(30):
        q.enqueue(f"{MODULE}.add", n, 1, job_id=f"done-{n:02d}")
    run_burst(redis_client, redis_url)
    finished = FinishedJobRegistry("default", connection=redis_client).get_job_ids()
    assert len(finished) == 30
    pages = all_pages(source, JobQuery(state="finished", queue="default", limit=7))
    flat = [job_id for page in pages for job_id in page]
    assert sorted(flat) == sorted(finished)
    assert len(flat) == len(set(flat))
    assert [len(page) for page in pages] == [7, 7, 7, 7, 2]
    # The entry a cursor names leaves (RQ's cleanup): the next page goes on after where it was.
    page_one = source.jobs(JobQuery(state="finished", queue="default", limit=7))
    redis_client.zrem("rq:finished:default", page_one.rows[-1].id)
    rest = all_pages(
        source, JobQuery(state="finished", queue="default", cursor=page_one.next_cursor, limit=7)
    )
    shown = [r.id for r in page_one.rows] + [job_id for page in rest for job_id in page]
    assert len(shown) == len(set(shown)) == 30


def test_a_failed_jobs_detail_has_its_call_checkpoint_and_traceback_and_search_finds_it(
    redis_client: redis.Redis[bytes], redis_url: str, source: DashboardSource
) -> None:
    q = queue(redis_client)
    q.enqueue(f"{MODULE}.boom", "first", job_id="bad-1")
    q.enqueue(f"{MODULE}.add", 2, 3, job_id="good-1")
    run_burst(redis_client, redis_url)
    # A job a producer still on RQ's pickle wrote, naming os.system: shown, never unpickled.
    pickled = Queue("default", connection=redis_client)  # RQ's default serializer
    pickled.enqueue("os.system", "echo pwned", job_id="pickled")

    detail = source.job("bad-1")
    assert detail is not None
    assert (detail.row.state, detail.row.task, detail.row.queue) == (
        "failed",
        f"{MODULE}.boom",
        "default",
    )
    assert detail.args is not None
    assert '"first"' in detail.args
    assert detail.checkpoint is None  # workerkit drops a failed job's checkpoint
    assert detail.error is not None
    assert "RuntimeError: boom first" in detail.error
    assert detail.row.error == "RuntimeError: boom first"
    assert detail.row.finished_at is not None
    assert detail.row.attempt == 1
    good = source.job("good-1")
    assert good is not None
    assert good.result == "5"
    assert good.row.state == "finished"
    weird = source.job("pickled")
    assert weird is not None
    assert weird.row.state == "waiting"
    assert weird.row.task == "(undecodable payload)"
    assert weird.args is None or weird.args.startswith("(not decoded")
    assert source.job("no-such-job") is None

    by_id = source.search("bad-1")
    assert [r.id for r in by_id.jobs] == ["bad-1"]
    by_task = source.search(f"{MODULE}.boom")
    assert [r.id for r in by_task.jobs] == ["bad-1"]  # failed: among the scanned states
    assert source.search(f"{MODULE}.add").jobs == ()  # finished jobs are found by id only
    assert SEARCH_SCAN == 1000
    idem = RedisIdempotencyStore(redis_client)
    claim = idem.claim("order-7", "fp", in_progress_expiry=60)
    assert idem.complete("order-7", claim.token, '{"ok": true}', retention=3600)
    [record] = source.search("order-7").idempotency
    assert (record.key, record.state, record.result) == ("order-7", "completed", '{"ok": true}')


def test_retry_puts_a_failed_job_back_due_now_with_attempts_reset_and_a_stale_retry_does_nothing(
    redis_client: redis.Redis[bytes],
    redis_url: str,
    source: DashboardSource,
    caplog: pytest.LogCaptureFixture,
) -> None:
    q = queue(redis_client)
    q.enqueue(f"{MODULE}.boom", "r", job_id="bad-r")
    run_burst(redis_client, redis_url)
    shown = row(source, "bad-r")
    assert read_state(redis_client, "bad-r")["attempts"] == 1

    with caplog.at_level(logging.INFO, logger="workerkit.dashboard"):
        source.retry_failed("bad-r", shown.version, "alice")
        with pytest.raises(StaleAction, match="bad-r changed since the page showed it"):
            source.retry_failed("bad-r", shown.version, "alice")  # the same page, again

    assert redis_client.lrange("rq:queue:default", 0, -1) == [b"bad-r"]
    assert FailedJobRegistry("default", connection=redis_client).get_job_ids() == []
    job = Job.fetch("bad-r", connection=redis_client, serializer=JSONSerializer)
    assert job.get_status() == "queued"
    assert redis_client.ttl("rq:job:bad-r") == -1
    assert read_state(redis_client, "bad-r")["attempts"] == 0
    assert row(source, "bad-r").state == "waiting"
    assert actions(caplog) == [
        ("retry", "bad-r", "alice", "done"),
        ("retry", "bad-r", "alice", "stale"),
    ]
    run_burst(redis_client, redis_url)  # it runs again, as attempt 1 (and fails again)
    assert read_state(redis_client, "bad-r")["attempts"] == 1
    # The earlier failure is kept in RQ's results (the job's history).
    assert len(job.results()) == 2


def test_discard_deletes_a_failed_job_and_refuses_when_it_changed_or_is_gone(
    redis_client: redis.Redis[bytes], redis_url: str, source: DashboardSource
) -> None:
    q = queue(redis_client)
    q.enqueue(f"{MODULE}.boom", "d", job_id="bad-d")
    q.enqueue(f"{MODULE}.boom", "e", job_id="bad-e")
    run_burst(redis_client, redis_url)
    old = row(source, "bad-e")
    source.retry_failed("bad-e", old.version, "bob")
    run_burst(redis_client, redis_url)  # failed again: a newer failure than the page showed

    with pytest.raises(StaleAction, match="now failed"):
        source.discard_failed("bad-e", old.version, "bob")
    assert redis_client.exists("rq:job:bad-e") == 1
    source.discard_failed("bad-d", row(source, "bad-d").version, "bob")

    assert redis_client.exists("rq:job:bad-d", "rq:results:bad-d", "rq:executions:bad-d") == 0
    assert FailedJobRegistry("default", connection=redis_client).get_job_ids() == ["bad-e"]
    with pytest.raises(ActionRefused, match="does not exist"):
        source.discard_failed("bad-d", "whatever", "bob")
    waiting = q.enqueue(f"{MODULE}.add", 1, 1, job_id="waiting")
    with pytest.raises(ActionRefused, match="is waiting: cannot discard"):
        source.discard_failed(waiting.id, row(source, "waiting").version, "bob")


def test_cancel_fails_a_waiting_or_scheduled_job_but_not_one_a_worker_took(
    redis_client: redis.Redis[bytes], redis_url: str, source: DashboardSource
) -> None:
    q = queue(redis_client)
    q.enqueue(f"{MODULE}.add", 1, 1, job_id="w-1")
    q.enqueue(f"{MODULE}.add", 2, 2, job_id="w-2")
    q.enqueue_in(timedelta(hours=1), f"{MODULE}.add", 3, 3, job_id="s-1")

    source.cancel_waiting("w-1", row(source, "w-1").version, "carol")
    source.cancel_waiting("s-1", row(source, "s-1").version, "carol")
    taken = row(source, "w-2")
    assert redis_client.lpop("rq:queue:default") == b"w-2"  # a worker's pop, before its start
    with pytest.raises(StaleAction, match="w-2 changed since the page showed it"):
        source.cancel_waiting("w-2", taken.version, "carol")

    assert redis_client.hget("rq:job:w-2", "status") == b"queued"  # untouched: the worker's
    assert sorted(FailedJobRegistry("default", connection=redis_client).get_job_ids()) == [
        "s-1",
        "w-1",
    ]
    assert redis_client.zcard("rq:scheduled:default") == 0
    cancelled = source.job("w-1")
    assert cancelled is not None
    assert cancelled.row.state == "failed"
    assert cancelled.error == "cancelled by carol from the dashboard"
    failed_page = source.jobs(JobQuery(state="failed"))
    assert {r.id for r in failed_page.rows} == {"s-1", "w-1"}
    # Still retryable, and it then runs.
    source.retry_failed("w-1", cancelled.row.version, "carol")
    run_burst(redis_client, redis_url)
    assert Job.fetch("w-1", connection=redis_client, serializer=JSONSerializer).return_value() == 2
    with pytest.raises(ActionRefused, match="is finished: cannot cancel"):
        source.cancel_waiting("w-1", row(source, "w-1").version, "carol")


def test_a_paused_queue_is_skipped_by_the_worker_until_resumed(
    redis_client: redis.Redis[bytes],
    redis_url: str,
    source: DashboardSource,
    caplog: pytest.LogCaptureFixture,
) -> None:
    queue(redis_client, "a").enqueue(f"{MODULE}.add", 1, 1, job_id="a-1")
    queue(redis_client, "b").enqueue(f"{MODULE}.add", 2, 2, job_id="b-1")

    with caplog.at_level(logging.INFO, logger="workerkit.dashboard"):
        source.pause_queue("a", "dave")
        source.pause_queue("a", "dave")  # changes nothing
        with pytest.raises(ActionRefused, match="no queue 'nope'"):
            source.pause_queue("nope", "dave")
    assert {s.name: s.paused for s in source.queues()} == {"a": True, "b": False}
    run_burst(redis_client, redis_url, "a", "b")
    assert redis_client.hget("rq:job:b-1", "status") == b"finished"
    assert redis_client.hget("rq:job:a-1", "status") == b"queued"

    source.resume_queue("a", "dave")
    run_burst(redis_client, redis_url, "a", "b")
    assert redis_client.hget("rq:job:a-1", "status") == b"finished"
    assert actions(caplog)[:3] == [
        ("pause", "a", "dave", "done"),
        ("pause", "a", "dave", "done"),
        ("pause", "nope", "dave", "refused"),
    ]


def test_presences_carry_redis_time_expire_after_an_hour_and_are_pruned(
    redis_client: redis.Redis[bytes], redis_url: str, source: DashboardSource
) -> None:
    store = presence_store(settings_for(redis_url))
    record = Presence(
        worker_id="w1",
        hostname="pod-1",
        pid=42,
        engine="rq",
        queues=("default",),
        concurrency=1,
        state="ready",
        started_at=1.0,
        heartbeat_at=0.0,
        ttl=15.0,
        counts={"default": {"succeeded": 3}},
    )
    try:
        store.publish(record)
        [back] = source.workers()
        assert back.worker_id == "w1"
        assert back.counts == {"default": {"succeeded": 3}}
        assert abs(back.heartbeat_at - source.clock()) < 5
        assert 3500 < redis_client.ttl(PRESENCE_KEY + ":w1") <= 3600
        redis_client.zadd(PRESENCE_KEY, {"ancient": 1.0})  # an hour and more ago
        store.publish(record)
        assert redis_client.zrange(PRESENCE_KEY, 0, -1) == [b"w1"]
        store.remove("w1")
        assert source.workers() == []
        assert store.set_queue_paused("q", True, "x")
        assert not store.set_queue_paused("q", True, "x")
        assert store.paused_queues() == frozenset({"q"})
        assert store.set_queue_paused("q", False, "x")
        assert store.paused_queues() == frozenset()
    finally:
        store.close()


def test_the_app_schedules_give_the_scheduler_binding(
    redis_url: str, source: DashboardSource
) -> None:
    assert source.scheduler() is None  # this app declares no schedule
    with_schedules = open_source(
        Settings(engine="rq", redis_url=redis_url, app="tests.apps.sched_rq:app")
    )
    try:
        binding = with_schedules.scheduler()
        assert binding is not None
        assert binding.schedules
    finally:
        with_schedules.close()


def test_a_pickled_payload_is_not_unpickled_even_under_safe_pickle(
    redis_client: redis.Redis[bytes], redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKERKIT_RQ_SERIALIZER", "safe-pickle")
    opened = open_source(settings_for(redis_url))
    try:
        Queue("default", connection=redis_client).enqueue("os.system", "echo pwned", job_id="p")
        Queue("default", connection=redis_client).enqueue(f"{MODULE}.add", 1, 2, job_id="q")
        redis_client.hset(
            "rq:job:p",
            "data",
            zlib.compress(pickle.dumps(("os.system", RqApp, ["x"], {}))),
        )
        refused = opened.job("p")
        assert refused is not None
        assert refused.args is not None
        assert "RefusedGlobal" in refused.args
        plain = opened.job("q")
        assert plain is not None
        assert plain.row.task == f"{MODULE}.add"
        assert plain.args is not None
        assert '"args": [\n  1,\n  2\n ]' in plain.args
    finally:
        opened.close()


@pytest.mark.parametrize(
    "cursor", ["not-a-cursor!", "bm90IGpzb24", "WzEsMiwzXQ", "WyJxIiwiYSIsIm0iLFtdXQ", "%%%"]
)
def test_a_cursor_that_is_not_ours_gives_the_first_page(
    redis_client: redis.Redis[bytes], source: DashboardSource, cursor: str
) -> None:
    """A hand-edited or stale URL's cursor (bad base64, not JSON, wrong shape): the first page,
    as on SQL, never an error page."""
    q = queue(redis_client)
    for n in range(3):
        q.enqueue(f"{MODULE}.add", n, 1, job_id=f"c-{n}")
    for state in ("waiting", "finished"):
        page = source.jobs(JobQuery(state=state, cursor=cursor, limit=2))  # type: ignore[arg-type]
        first = source.jobs(JobQuery(state=state, limit=2))  # type: ignore[arg-type]
        assert [r.id for r in page.rows] == [r.id for r in first.rows]


def test_cancel_refuses_a_scheduled_job_due_soon_while_rqs_scheduler_runs(
    redis_client: redis.Redis[bytes], redis_url: str, source: DashboardSource
) -> None:
    """RQ's scheduler reads the due jobs, then saves them queued in a later MULTI: a cancel in
    between would leave the job failed and queued. Due within the margin while a scheduler
    holds the queue's lock: refused, nothing changed. Later, or with no scheduler: cancelled."""
    q = queue(redis_client)
    q.enqueue_in(timedelta(seconds=2), f"{MODULE}.add", 1, 1, job_id="soon")
    q.enqueue_in(timedelta(hours=1), f"{MODULE}.add", 2, 2, job_id="later")
    scheduler = RQScheduler(["default"], connection=redis_client)
    assert scheduler.acquire_locks() == {"default"}  # what `rq worker --with-scheduler` holds
    soon = row(source, "soon")
    with pytest.raises(ActionRefused, match=r"due within 5 s and RQ's scheduler runs"):
        source.cancel_waiting("soon", soon.version, "carol")
    assert redis_client.hget("rq:job:soon", "status") == b"scheduled"
    assert redis_client.zscore("rq:scheduled:default", "soon") is not None
    assert row(source, "soon").version == soon.version  # untouched
    source.cancel_waiting("later", row(source, "later").version, "carol")  # not due: cancelled
    assert redis_client.hget("rq:job:later", "status") == b"failed"
    redis_client.delete(RQScheduler.get_locking_key("default"))  # no scheduler: no race
    source.cancel_waiting("soon", soon.version, "carol")
    assert redis_client.hget("rq:job:soon", "status") == b"failed"


def test_list_pages_read_only_the_fields_a_row_shows(
    redis_client: redis.Redis[bytes], redis_url: str, source: DashboardSource
) -> None:
    """A 5 MB meta and a 5 MB return value: a list page reads neither (HMGET of the row's
    fields, no result for a finished row); measured as the bytes Redis sent."""
    size = 5 * 1024 * 1024
    q = queue(redis_client)
    done = q.enqueue(f"{MODULE}.big", size, job_id="big-result")
    run_burst(redis_client, redis_url)
    assert done.return_value() is not None
    waiting = q.enqueue(f"{MODULE}.add", 1, 2, job_id="big-meta")
    waiting.meta["blob"] = "m" * size
    waiting.save_meta()

    for state, job_id in (("waiting", "big-meta"), ("finished", "big-result")):
        redis_client.config_resetstat()
        page = source.jobs(JobQuery(state=state))  # type: ignore[arg-type]
        sent = int(redis_client.info("stats")["total_net_output_bytes"])  # bytes Redis sent
        assert [r.id for r in page.rows] == [job_id]
        assert page.rows[0].task in (f"{MODULE}.add", f"{MODULE}.big")
        assert sent < 256 * 1024, f"{state} page: Redis sent {sent} bytes"
    stats = redis_client.info("commandstats")
    assert "cmdstat_hgetall" not in stats
    detail = source.job("big-result")  # the detail still has it all (cut at 64 KiB)
    assert detail is not None
    assert detail.result is not None
    assert len(detail.result) > 60 * 1024
