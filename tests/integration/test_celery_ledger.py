"""The celery engine's Redis ledger against a real Redis: restores are fenced by leases."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("celery")

from celery import Celery

from workerkit.engines.celery import (
    CRASHES_HEADER,
    GEN_HEADER,
    CeleryEngine,
    Ledger,
    celery_facts,
    configure_app,
)
from workerkit.errors import LeaseLost
from workerkit.settings import Settings


@pytest.fixture
def app(redis_url: str) -> Celery:
    app = Celery("t", broker=redis_url)
    configure_app(app, Settings(engine="celery", redis_url=redis_url))
    return app


def _deliver(app: Celery, redis_client: Any, task_id: str) -> str:
    """Publish one message and take it as kombu's Redis transport does (without a worker)."""
    app.send_task("noop", args=[], task_id=task_id, queue="celery")
    # The binding kombu declares with the queue (its in-memory declare cache may skip it after
    # the previous test's FLUSHDB); restores route through it.
    redis_client.sadd("_kombu.binding.celery", "celery\x06\x16\x06\x16celery")
    return _take(redis_client)


def _take(redis_client: Any) -> str:
    """Deliver the message at the head of the queue: into kombu's ``unacked`` bookkeeping."""
    raw = redis_client.rpop("celery")
    payload = json.loads(raw)
    tag = payload["properties"]["delivery_tag"]
    redis_client.hset("unacked", tag, json.dumps([payload, "celery", "celery"]))
    redis_client.zadd("unacked_index", {tag: 1.0})
    return str(tag)


def test_configure_app_sets_safe_defaults_and_facts_report_overrides(redis_url: str) -> None:
    app = Celery("t", broker=redis_url)
    app.conf.worker_prefetch_multiplier = 8
    assert celery_facts(app).prefetch_multiplier == 8
    assert celery_facts(app).acks_late is None
    configure_app(app, Settings(engine="celery", redis_url=redis_url, job_timeout=100))
    assert app.conf.task_acks_late is True
    assert app.conf.worker_prefetch_multiplier == 8  # the user's value is kept (and reported)
    app.finalize()  # the time limits come once the tasks are bound (see config.limit_tasks)
    assert app.conf.task_time_limit == 100
    assert app.conf.broker_transport_options["visibility_timeout"] == 3600


def test_restore_skips_a_message_leased_by_a_live_worker(app: Celery, redis_client: Any) -> None:
    ledger = Ledger(app)
    tag = _deliver(app, redis_client, "t1")
    ledger.renew_leases([tag], "worker-a", 30)
    assert ledger.abandoned(older_than=2.0) == []
    assert not ledger.restore(tag)  # crash recovery: the owner is alive
    assert not ledger.restore(tag, owners=("worker-b",))
    assert ledger.restore(tag, owners=("worker-a",))  # the owner itself releases it
    assert redis_client.hlen("unacked") == 0
    assert [json.loads(m)["headers"]["id"] for m in redis_client.lrange("celery", 0, -1)] == ["t1"]
    assert not ledger.restore(tag, owners=("worker-a",))  # once only
    ledger.close()


def test_abandoned_message_is_restored_once(app: Celery, redis_client: Any) -> None:
    ledger, other = Ledger(app), Ledger(app)
    tag = _deliver(app, redis_client, "t2")
    assert ledger.abandoned(older_than=2.0) == [tag]
    assert ledger.restore(tag)
    assert not other.restore(tag)
    assert redis_client.llen("celery") == 1
    ledger.close()
    other.close()


#: The app CeleryEngine loads by name (``settings.app``) in the release tests below.
engine_app = Celery("t-engine")


def _engine_settings(redis_url: str) -> Settings:
    engine_app.conf.broker_url = redis_url
    return Settings(engine="celery", redis_url=redis_url, app=f"{__name__}:engine_app")


def test_release_in_flight_restores_a_dead_workers_messages(
    app: Celery, redis_client: Any, redis_url: str
) -> None:
    first, second = _deliver(app, redis_client, "r1"), _deliver(app, redis_client, "r2")
    Ledger(app).renew_leases([first, second], "dead-worker", 30)
    refs = [
        {"delivery_tag": first, "worker": "dead-worker"},
        {"job_id": "r0", "delivery_tag": None},  # never delivered: nothing to restore
        {"delivery_tag": second, "worker": "dead-worker"},
    ]
    engine = CeleryEngine()
    settings = _engine_settings(redis_url)
    assert engine.release_in_flight(settings, refs, crashed=True) == 2
    assert redis_client.hlen("unacked") == 0
    queued = [json.loads(m)["headers"] for m in redis_client.lrange("celery", 0, -1)]
    assert sorted(h["id"] for h in queued) == ["r1", "r2"]
    assert all(h[CRASHES_HEADER] == 1 for h in queued)  # the worker died: the attempt counts
    assert engine.release_in_flight(settings, refs) == 0  # once only
    assert engine.release_in_flight(settings, []) == 0


def test_release_in_flight_gives_up_at_the_first_broker_error(
    app: Celery, redis_client: Any, redis_url: str, monkeypatch: Any, caplog: Any
) -> None:
    tags = [_deliver(app, redis_client, "r3"), _deliver(app, redis_client, "r4")]
    calls = []

    def unreachable(self: Ledger, tag: str, **kwargs: Any) -> bool:
        calls.append(tag)
        raise ConnectionError("broker down")

    monkeypatch.setattr(Ledger, "restore", unreachable)
    refs = [{"delivery_tag": tag, "worker": "w"} for tag in tags]
    with caplog.at_level("WARNING", logger="workerkit.engines.celery"):
        assert CeleryEngine().release_in_flight(_engine_settings(redis_url), refs) == 0
    assert calls == tags[:1]  # crash recovery restores the rest, sooner than more timeouts
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "release_failed"]
    assert record.getMessage() == "cannot release a message; crash recovery will"
    assert (record.error, record.left) == ("broker down", 2)


def _headers(redis_client: Any) -> dict[str, Any]:
    [raw] = redis_client.lrange("celery", 0, -1)
    headers: dict[str, Any] = json.loads(raw)["headers"]
    return headers


def test_restore_counts_crashes_and_generations_in_the_message(
    app: Celery, redis_client: Any
) -> None:
    ledger = Ledger(app)
    tag = _deliver(app, redis_client, "t4")
    assert ledger.restore(tag)  # a release: a new generation, the attempt not counted
    headers = _headers(redis_client)
    assert (headers[GEN_HEADER], headers.get(CRASHES_HEADER)) == (1, None)
    assert headers["redelivered"] is True
    assert _take(redis_client) == tag  # redelivered, with the same tag
    assert ledger.restore(tag, crashed=True)  # its worker died: the attempt counts
    headers = _headers(redis_client)
    assert (headers[GEN_HEADER], headers[CRASHES_HEADER]) == (2, 1)
    assert headers["id"] == "t4"
    ledger.close()


def test_restore_without_the_binding_key_falls_back_to_the_apps_queue(
    app: Celery, redis_client: Any
) -> None:
    # kombu's own restore routes through _kombu.binding.<exchange>; without it, the message
    # went to no queue and was lost.
    ledger = Ledger(app)
    tag = _deliver(app, redis_client, "t5")
    redis_client.delete("_kombu.binding.celery")
    assert ledger.restore(tag)
    assert [json.loads(m)["headers"]["id"] for m in redis_client.lrange("celery", 0, -1)] == ["t5"]
    assert redis_client.hlen("unacked") == 0
    ledger.close()


def test_unroutable_restore_leaves_the_message_unacknowledged(
    app: Celery, redis_client: Any
) -> None:
    ledger = Ledger(app)
    tag = _deliver(app, redis_client, "t6")
    payload, _, _ = json.loads(redis_client.hget("unacked", tag))
    redis_client.hset("unacked", tag, json.dumps([payload, "nowhere", "no-such-queue"]))
    assert not ledger.restore(tag)
    assert redis_client.hexists("unacked", tag)  # never dropped
    assert redis_client.zscore("unacked_index", tag) is not None
    assert redis_client.llen("celery") == 0
    ledger.close()


def test_checkpoint_is_fenced_by_the_newest_generation(app: Celery) -> None:
    ledger = Ledger(app)
    old, new, newer_retry = (0, 0, 1000), (0, 1, 500), (1, 0, 0)
    assert ledger.claim_checkpoint("t3", old) == (True, None)
    ledger.save_checkpoint("t3", old, {"at": 5})
    # A newer generation (a restore) wins even with an earlier clock; it reads the old state.
    assert ledger.claim_checkpoint("t3", new) == (True, {"at": 5})
    with pytest.raises(LeaseLost):
        ledger.save_checkpoint("t3", old, {"at": 6})
    assert ledger.claim_checkpoint("t3", old) == (False, {"at": 5})  # stale: told so
    ledger.save_checkpoint("t3", new, {"at": 7})
    # Within one generation, the later start wins (two runs of one delivery).
    later = (0, 1, 600)
    ledger.save_checkpoint("t3", later, {"at": 8})
    with pytest.raises(LeaseLost):
        ledger.save_checkpoint("t3", new, {"at": 9})
    # A Celery retry is newer than every restore of the message before it.
    ledger.save_checkpoint("t3", newer_retry, {"at": 10})
    ledger.finish("t3", later)  # a stale attempt's success deletes nothing
    assert ledger.claim_checkpoint("t3", newer_retry) == (True, {"at": 10})
    ledger.finish("t3", newer_retry)
    assert ledger.claim_checkpoint("t3", old) == (True, None)
    ledger.close()


def test_renewal_is_fenced_by_the_holder_and_the_unacked_entry(
    app: Celery, redis_client: Any
) -> None:
    ledger = Ledger(app)
    mine, theirs = _deliver(app, redis_client, "n1"), _deliver(app, redis_client, "n2")
    redis_client.set(Ledger.key("lease", theirs), "worker-b")  # delivered again, to b
    gone = "never-delivered"
    # An expired lease on a message still unacknowledged is taken back; another holder's, or
    # one whose message left ``unacked`` (acknowledged, restored), is lost.
    assert ledger.renew_leases([mine, theirs, gone], "worker-a", 30) == [theirs, gone]
    assert redis_client.get(Ledger.key("lease", mine)) == b"worker-a"
    assert redis_client.get(Ledger.key("lease", theirs)) == b"worker-b"
    assert not redis_client.exists(Ledger.key("lease", gone))
    assert ledger.renew_leases([], "worker-a", 30) == []
    ledger.close()


def test_ack_is_fenced_by_the_lease(app: Celery, redis_client: Any) -> None:
    ledger = Ledger(app)
    tag = _deliver(app, redis_client, "k1")
    redis_client.set(Ledger.key("lease", tag), "worker-b")
    assert not ledger.ack(tag, "worker-a")  # b holds it: a's late ack removes nothing
    assert redis_client.hexists("unacked", tag)
    assert redis_client.zscore("unacked_index", tag)
    assert ledger.ack(tag, "worker-b")
    assert not redis_client.hexists("unacked", tag)
    assert redis_client.zscore("unacked_index", tag) is None
    assert not redis_client.exists(Ledger.key("lease", tag))
    other = _deliver(app, redis_client, "k2")
    assert ledger.ack(other, "worker-a")  # no lease (expired, nobody took it): acknowledged
    assert redis_client.hlen("unacked") == 0
    ledger.close()


def test_an_ack_after_a_restore_is_not_a_settle(app: Celery, redis_client: Any) -> None:
    # The lease expired and a worker restored the message; nobody took it yet. A late ack of
    # the first run must not report the message settled: it is back in its queue, to run again.
    ledger = Ledger(app)
    tag = _deliver(app, redis_client, "r1")
    redis_client.set(Ledger.key("lease", tag), "worker-a")
    assert ledger.restore(tag, owners=("worker-a",))
    assert not redis_client.exists(Ledger.key("lease", tag))
    assert not ledger.ack(tag, "worker-a")
    assert redis_client.llen("celery") == 1  # untouched: still queued
    assert not redis_client.exists(Ledger.key("lease", tag))
    ledger.close()


def test_leases_acks_and_recovery_use_kombus_global_keyprefix(
    redis_url: str, redis_client: Any
) -> None:
    # kombu's client prefixes the commands it knows and an EVALSHA's first key only: the
    # ledger's other keys must get the prefix too, or its fences would look at other keys.
    app = Celery("t", broker=redis_url)
    app.conf.broker_transport_options = {"global_keyprefix": "wk:"}
    configure_app(app, Settings(engine="celery", redis_url=redis_url))
    ledger = Ledger(app)
    app.send_task("noop", args=[], task_id="p1", queue="celery")
    payload = json.loads(redis_client.rpop("wk:celery"))
    tag = str(payload["properties"]["delivery_tag"])
    redis_client.hset("wk:unacked", tag, json.dumps([payload, "celery", "celery"]))
    redis_client.zadd("wk:unacked_index", {tag: 1.0})
    redis_client.set(f"wk:{Ledger.key('lease', tag)}", "worker-a")  # what the delivery writes
    assert ledger.renew_leases([tag], "worker-a", 30) == []
    assert ledger.abandoned(older_than=2.0) == []  # its lease is alive
    assert not ledger.ack(tag, "worker-b")
    assert not ledger.restore(tag, owners=("worker-b",))
    redis_client.delete(f"wk:{Ledger.key('lease', tag)}")
    assert ledger.abandoned(older_than=2.0) == [tag]
    assert ledger.restore(tag)
    assert redis_client.hlen("wk:unacked") == 0
    assert redis_client.llen("wk:celery") == 1
    ledger.close()
