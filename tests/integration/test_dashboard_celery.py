"""The dashboard's Celery source (engines/celery/dashboard.py) on a real Redis, with tasks sent
as Celery users send them (delay, apply_async, countdown) and deliveries made by a real kombu
channel through workerkit's reliable pop: counts, pages, details, search, and every action
fenced by the entry the page showed (a second click finds it changed: nothing done)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from queue import Empty
from typing import Any

import pytest

pytest.importorskip("celery")

from celery import Celery

from tests.apps import celery_schedules
from tests.apps.celery_dashboard import app, build_report, send_mail
from workerkit.dashboard.model import ActionRefused, JobQuery, StaleAction
from workerkit.engines.celery.dashboard import CeleryDashboardSource, open_source, presence_store
from workerkit.engines.celery.dashboard_worker import broker_client
from workerkit.engines.celery.delivery import lease_at_delivery
from workerkit.engines.celery.pop import InFlight, reliable_pop
from workerkit.engines.presence import PausedQueues, Presence
from workerkit.idempotency.redis import RedisIdempotencyStore
from workerkit.settings import Settings

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _settings(redis_url: str) -> Settings:
    return Settings(engine="celery", app="tests.apps.celery_dashboard:app", redis_url=redis_url)


@pytest.fixture
def source(redis_url: str) -> Iterator[CeleryDashboardSource]:
    app.conf.broker_url = redis_url
    made = open_source(_settings(redis_url))
    yield made
    made.close()


class Worker:
    """A kombu channel consuming through workerkit's reliable pop and lease (no pool)."""

    def __init__(self, queue: str, paused: PausedQueues | None = None) -> None:
        self.connection = app.connection_for_write()
        self.channel: Any = self.connection.default_channel
        self.got: list[Any] = []
        self.channel.basic_consume(queue, False, self.got.append, "t-" + queue)
        self.flight = InFlight("host:1:w1", 30.0, "", paused)
        lease_at_delivery(self.channel.qos, "host:1:w1", 30.0, self.flight)
        reliable_pop(self.channel, self.flight, lambda *a, **k: None)
        client = self.channel.client
        client.connection = client.connection_pool.get_connection()
        client.connection.connect()

    def pop(self) -> bool:
        self.channel._brpop_start()
        try:
            return bool(self.channel._brpop_read())
        except Empty:
            return False

    def close(self) -> None:
        self.connection.release()


def _summary(source: CeleryDashboardSource, name: str) -> Any:
    return next(q for q in source.queues() if q.name == name)


def test_queue_counts_show_waiting_scheduled_running_and_failed(
    source: CeleryDashboardSource,
) -> None:
    later = send_mail.apply_async(("later@example.com",), countdown=600)
    for n in range(3):
        send_mail.delay(f"user{n}@example.com")
    build_report.apply_async(("daily",))
    worker = Worker("mail")
    try:
        assert worker.pop()  # the countdown message: held by the worker until its eta
        assert worker.pop()  # the first sent: running (held, no eta)
        waiting = source.jobs(JobQuery(state="waiting", queue="mail"))
        assert [row.attempt for row in waiting.rows] == [1, 1]
        cancel = waiting.rows[0]
        source.cancel_waiting(cancel.id, cancel.version, "alice")
        mail = _summary(source, "mail")
        assert (mail.waiting, mail.scheduled, mail.running) == (1, 1, 1)
        assert (mail.failed, mail.finished, mail.oldest_waiting_age) == (1, None, None)
        reports = _summary(source, "reports")
        assert (reports.waiting, reports.running, reports.failed, reports.paused) == (
            1,
            0,
            0,
            False,
        )
        scheduled = source.jobs(JobQuery(state="scheduled"))
        assert [row.id for row in scheduled.rows] == [later.id]
        assert scheduled.rows[0].run_at is not None
        assert scheduled.rows[0].run_at > source.clock() + 500
        running = source.jobs(JobQuery(state="running", queue="mail")).rows
        assert {row.worker for row in running} == {"host:1:w1"}
        assert all(
            row.lease_expires_at and row.lease_expires_at > source.clock() for row in running
        )
    finally:
        worker.close()


def test_pages_follow_the_run_order_and_end(source: CeleryDashboardSource) -> None:
    sent = [send_mail.delay(f"u{n}@example.com").id for n in range(7)]
    build_report.delay("x")
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = source.jobs(JobQuery(state="waiting", queue="mail", cursor=cursor, limit=3))
        pages += 1
        assert page.total == 7
        seen += [row.id for row in page.rows]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert (seen, pages) == (sent, 3)
    by_task = source.jobs(JobQuery(state="waiting", task="build_report"))
    assert [(r.task, r.queue) for r in by_task.rows] == [("build_report", "reports")]


@pytest.mark.parametrize("cursor", ["-1:-3", "0:-5", "x", "\u00b2", "1:\u00b2"])
def test_a_cursor_that_is_not_ours_gives_the_first_page(
    source: CeleryDashboardSource, cursor: str
) -> None:
    """A hand-edited URL's cursor: the first page, as on SQL, never an error page."""
    for n in range(3):
        send_mail.delay(f"u{n}@example.com")
    send_mail.apply_async(("later@example.com",), countdown=600)
    worker = Worker("mail")
    try:
        assert worker.pop()  # the countdown message: held until its eta
        for state in ("waiting", "scheduled"):
            page = source.jobs(JobQuery(state=state, cursor=cursor, limit=2))  # type: ignore[arg-type]
            first = source.jobs(JobQuery(state=state, limit=2))  # type: ignore[arg-type]
            assert [r.id for r in page.rows] == [r.id for r in first.rows], state
    finally:
        worker.close()


def test_a_job_detail_decodes_json_and_never_pickle(source: CeleryDashboardSource) -> None:
    sent = send_mail.apply_async(("ann@example.com",), {"subject": "hi"}, retries=0)
    found = source.job(sent.id)
    assert found is not None
    assert (found.row.state, found.row.task, found.row.queue) == ("waiting", "send_mail", "mail")
    assert found.args is not None
    assert json.loads(found.args)[:2] == [["ann@example.com"], {"subject": "hi"}]
    assert found.extra["header task"] == '"send_mail"'
    pickled = send_mail.apply_async(("bob@example.com",), serializer="pickle")
    shown = source.job(pickled.id)
    assert shown is not None
    assert shown.args == "pickle, not decoded"
    assert source.job("no-such-task") is None


def test_search_finds_an_id_a_task_name_and_an_idempotency_record(
    source: CeleryDashboardSource, redis_client: Any
) -> None:
    one = send_mail.delay("a@example.com")
    build_report.delay("r1")
    build_report.delay("r2")
    assert [row.id for row in source.search(one.id).jobs] == [one.id]
    assert [row.task for row in source.search("build_report").jobs] == ["build_report"] * 2
    store = RedisIdempotencyStore(redis_client)
    store.claim("invoice-42", "fp", in_progress_expiry=60)
    found = source.search("invoice-42")
    assert [(v.key, v.state) for v in found.idempotency] == [("invoice-42", "in_progress")]
    assert found.jobs == ()


def test_cancel_retry_and_discard_are_fenced_by_the_entry_shown(
    source: CeleryDashboardSource, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="workerkit.dashboard")
    sent = send_mail.delay("c@example.com")
    shown = source.jobs(JobQuery(state="waiting")).rows[0]
    with pytest.raises(StaleAction):
        source.cancel_waiting(sent.id, "0" * 40, "alice")  # not the entry shown
    assert _summary(source, "mail").waiting == 1
    source.cancel_waiting(sent.id, shown.version, "alice")
    with pytest.raises(StaleAction, match="now failed"):
        source.cancel_waiting(sent.id, shown.version, "alice")  # a second click
    failed = source.jobs(JobQuery(state="failed")).rows
    assert [(r.id, r.error) for r in failed] == [(sent.id, "cancelled by alice from the dashboard")]
    source.retry_failed(sent.id, failed[0].version, "bob")
    with pytest.raises(StaleAction, match="now waiting"):
        source.retry_failed(sent.id, failed[0].version, "bob")
    back = source.job(sent.id)
    assert back is not None
    assert (back.row.state, back.row.attempt) == ("waiting", 1)
    source.cancel_waiting(sent.id, back.row.version, "bob")
    again = source.jobs(JobQuery(state="failed")).rows[0]
    source.discard_failed(sent.id, again.version, "bob")
    with pytest.raises(StaleAction, match="now gone"):
        source.discard_failed(sent.id, again.version, "bob")
    assert source.job(sent.id) is None
    actions = [
        (r.action, r.outcome)  # type: ignore[attr-defined]
        for r in caplog.records
        if getattr(r, "event", None) == "dashboard_action"
    ]
    assert actions == [
        ("cancel", "stale"),
        ("cancel", "done"),
        ("cancel", "stale"),
        ("retry", "done"),
        ("retry", "stale"),
        ("cancel", "done"),
        ("discard", "done"),
        ("discard", "stale"),
    ]


def test_a_retried_message_runs_again_from_its_queue(source: CeleryDashboardSource) -> None:
    sent = build_report.delay("again")
    shown = source.jobs(JobQuery(state="waiting", queue="reports")).rows[0]
    before = source.job(sent.id)
    assert before is not None
    source.cancel_waiting(sent.id, shown.version, "alice")
    failed = source.jobs(JobQuery(state="failed", queue="reports")).rows[0]
    source.retry_failed(sent.id, failed.version, "alice")
    worker = Worker("reports")
    try:
        assert worker.pop()
        assert [m.headers["id"] for m in worker.got] == [sent.id]
        assert worker.got[0].headers["retries"] == 0
        # Another delivery: never the old delivery's tag (its unacked record and lease).
        old_tag = json.loads(before.extra["property delivery_tag"])
        assert worker.got[0].delivery_tag not in (None, old_tag)
    finally:
        worker.close()


def test_pause_leaves_the_queue_out_of_the_pop_and_resume_brings_it_back(
    source: CeleryDashboardSource, redis_url: str
) -> None:
    store = presence_store(_settings(redis_url))
    sent = send_mail.delay("p@example.com")
    source.pause_queue("mail", "alice")
    source.pause_queue("mail", "alice")  # unchanged
    assert store.paused_queues() == frozenset({"mail"})
    assert _summary(source, "mail").paused
    with pytest.raises(ActionRefused):
        source.pause_queue("no-such-queue", "alice")
    worker = Worker("mail", PausedQueues(store.paused_queues, refresh=0.0))
    try:
        assert not worker.pop()  # every queue paused: an idle wait, nothing popped
        assert _summary(source, "mail").waiting == 1
        source.resume_queue("mail", "alice")
        assert worker.pop()
        assert [m.headers["id"] for m in worker.got] == [sent.id]
    finally:
        worker.close()
    assert not _summary(source, "mail").paused


def test_presences_carry_the_redis_clock_and_expire(
    source: CeleryDashboardSource, redis_url: str, redis_client: Any
) -> None:
    store = presence_store(_settings(redis_url))
    record = Presence(
        worker_id="host:1:w1",
        hostname="host",
        pid=1,
        engine="celery",
        queues=("mail", "reports"),
        concurrency=2,
        state="ready",
        started_at=1.0,
        heartbeat_at=0.0,
        ttl=15.0,
        jobs=("a",),
        counts={"mail": {"succeeded": 3}},
    )
    store.publish(record)
    [shown] = source.workers()
    assert abs(shown.heartbeat_at - source.clock()) < 5
    assert shown.queues == ("mail", "reports")
    assert shown.counts == {"mail": {"succeeded": 3}}
    assert 3500 < redis_client.ttl("workerkit:presence:host:1:w1") <= 3600
    store.remove("host:1:w1")
    assert source.workers() == []


def test_kombus_key_prefix_is_in_front_of_every_key_read_and_written(
    redis_url: str, redis_client: Any
) -> None:
    prefixed = Celery("prefixed", broker=redis_url)
    prefixed.conf.update(
        broker_transport_options={"global_keyprefix": "wk:"}, task_default_queue="mail"
    )
    sent = prefixed.send_task("send_mail", args=["x@example.com"], queue="mail")
    assert redis_client.llen("wk:mail") == 1
    source = CeleryDashboardSource(prefixed, _settings(redis_url), broker_client(redis_url))
    try:
        [shown] = source.jobs(JobQuery(state="waiting", queue="mail")).rows
        assert shown.id == sent.id
        source.cancel_waiting(sent.id, shown.version, "alice")
        assert redis_client.llen("wk:workerkit:celery:dead:mail") == 1
        [failed] = source.jobs(JobQuery(state="failed", queue="mail")).rows
        source.retry_failed(sent.id, failed.version, "alice")
        assert redis_client.llen("wk:mail") == 1
        source.pause_queue("mail", "alice")
        assert redis_client.hkeys("wk:workerkit:paused") == [b"mail"]
        assert [q.paused for q in source.queues() if q.name == "mail"] == [True]
    finally:
        source.close()


def test_the_scheduler_binding_is_the_apps_beat_schedule_or_none(
    source: CeleryDashboardSource, redis_url: str
) -> None:
    assert source.scheduler() is None  # no beat_schedule
    celery_schedules.app.conf.broker_url = redis_url
    settings = Settings(engine="celery", app="tests.apps.celery_schedules:app", redis_url=redis_url)
    scheduled = open_source(settings)
    try:
        binding = scheduled.scheduler()
        assert binding is not None
        assert {s.name for s in binding.schedules} >= {"tick", "minutely", "nightly"}
    finally:
        scheduled.close()


def test_a_scheduled_message_is_cancelled_with_its_lease_and_a_due_one_is_refused(
    source: CeleryDashboardSource, redis_client: Any
) -> None:
    far = send_mail.apply_async(("far@example.com",), countdown=3600)
    near = send_mail.apply_async(("near@example.com",), countdown=2)
    worker = Worker("mail")
    try:
        assert worker.pop()
        assert worker.pop()
        rows = {r.id: r for r in source.jobs(JobQuery(state="scheduled")).rows}
        assert set(rows) == {far.id, near.id}
        with pytest.raises(ActionRefused, match="due within the recovery window"):
            source.cancel_waiting(near.id, rows[near.id].version, "alice")
        source.cancel_waiting(far.id, rows[far.id].version, "alice")
        with pytest.raises(StaleAction):
            source.cancel_waiting(far.id, rows[far.id].version, "alice")
        tags = {t.decode() for t in redis_client.hkeys("unacked")}
        assert len(tags) == 1  # near's only
        assert not redis_client.exists(
            f"workerkit:celery:lease:{rows[far.id].version.split(':')[0]}"
        )
        [failed] = source.jobs(JobQuery(state="failed")).rows
        assert (failed.id, failed.error) == (far.id, "cancelled by alice from the dashboard")
        source.retry_failed(far.id, failed.version, "alice")  # back, due now
        waiting = source.jobs(JobQuery(state="waiting")).rows
        assert [(r.id, r.run_at) for r in waiting] == [(far.id, None)]
    finally:
        worker.close()
