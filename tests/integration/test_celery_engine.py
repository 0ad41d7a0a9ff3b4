"""The celery engine's Redis ledger against a real Redis: restores are fenced by leases."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("celery")

from celery import Celery

from workerkit.engines.celery import Ledger, celery_facts, configure_app
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
    assert app.conf.task_time_limit == 100
    assert app.conf.broker_transport_options["visibility_timeout"] == 3600


def test_restore_skips_a_message_leased_by_a_live_worker(app: Celery, redis_client: Any) -> None:
    ledger = Ledger(app)
    tag = _deliver(app, redis_client, "t1")
    ledger.refresh_leases([tag], "worker-a", 30)
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


def test_checkpoint_is_fenced_by_the_newest_attempt(app: Celery) -> None:
    ledger = Ledger(app)
    assert ledger.begin("t3", "old") == (1, None)
    ledger.save_checkpoint("t3", "old", {"at": 5})
    assert ledger.begin("t3", "new") == (2, {"at": 5})
    with pytest.raises(LeaseLost):
        ledger.save_checkpoint("t3", "old", {"at": 6})
    ledger.give_back_attempt("t3")
    assert ledger.begin("t3", "newer")[0] == 2
    ledger.finish("t3")
    assert ledger.begin("t3", "x") == (1, None)
    ledger.close()
