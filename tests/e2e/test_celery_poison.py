"""Queue entries kombu cannot read (issue 13, celery (c)): dead-lettered, the worker goes on.

Before: a non-JSON entry in the queue list raised in kombu's BRPOP read, in the consumer's loop,
and the worker exited (5), losing the popped entry.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.celery_harness import celery_supervisor, send
from tests.support.harness import Env, wait_until

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:celery"),
]

_ENVELOPE = {"body": "W1tdLCB7fSwge31d", "content-encoding": "utf-8", "headers": {}}

POISON: list[tuple[bytes, str]] = [
    (b"\xff\xfe not text", "not UTF-8 text"),
    (b"plain words", "not JSON"),
    (b"[1, 2]", "a JSON list, not an object"),
    (json.dumps(_ENVELOPE).encode(), "no 'properties' object"),
    (
        json.dumps({**_ENVELOPE, "properties": {"delivery_tag": "t"}}).encode(),
        "no 'properties.delivery_info'",
    ),
]


def test_entries_kombu_cannot_read_are_dead_lettered_and_the_worker_goes_on(
    tmp_path: Path, redis_url: str, redis_client: Any
) -> None:
    env = Env(tmp=tmp_path, database_url="", journal=tmp_path / "journal.txt")
    send(redis_url, "noop", "before", task_id="before")
    for raw, _ in POISON:
        redis_client.lpush("celery", raw)  # kombu pops from the right: after "before"
    send(redis_url, "noop", "after", task_id="after")
    with celery_supervisor(env, redis_url, worker_args=("--pool=prefork",)) as pod:
        pod.wait_ready()
        wait_until(
            lambda: any(line.startswith("noop after") for line in env.lines()),
            timeout=30,
            what="the task behind the poison entries to run",
        )
        wait_until(
            lambda: len(pod.events_named("queue_entry_dead_lettered")) == len(POISON),
            timeout=10,
            what="every refusal logged",
        )
        records = [
            json.loads(r) for r in redis_client.lrange("workerkit:celery:dead:celery", 0, -1)
        ]
        assert [base64.b64decode(r["entry"]) for r in records] == [raw for raw, _ in POISON]
        for record, (_, says) in zip(records, POISON, strict=True):
            assert says in record["reason"], record
            assert record["queue"] == "celery"
        for event in pod.events_named("queue_entry_dead_lettered"):
            assert event["level"] == "error"
            assert event["dead_letter"] == "workerkit:celery:dead:celery"
        refused = (
            'workerkit_payloads_refused_total{engine="celery",queue="celery",'
            f'reason="undecodable"}} {len(POISON):.1f}'
        )
        wait_until(lambda: refused in pod.get("/metrics")[1], timeout=10, what=refused)
        assert redis_client.llen("celery") == 0
        assert pod.proc.poll() is None, pod.log_text()
        assert not pod.events_named("worker_crashed"), pod.log_text()
