"""The celery engine's outage retries and its check of queue entries (our own logic)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

pytest.importorskip("celery")

from redis.exceptions import BusyLoadingError, ResponseError
from redis.exceptions import ConnectionError as BrokerDown

from workerkit.engines.celery.outage import RETRY_MAX, backoff, retrying
from workerkit.engines.celery.poison import dead_key, dead_record, refusal


def _failing(times: int, exc: Exception) -> Any:
    calls: list[int] = []

    def write() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise exc
        return "landed"

    write.calls = calls  # type: ignore[attr-defined]
    return write


def test_a_write_is_retried_while_allowed_and_lands() -> None:
    write = _failing(3, BrokerDown("killed"))
    sleeps: list[float] = []
    assert retrying("ack", "j", write, keep_trying=lambda: True, sleep=sleeps.append) == "landed"
    assert len(write.calls) == 4
    assert len(sleeps) == 3
    assert all(0 < s <= 0.5 for s in sleeps)


def test_a_server_still_loading_its_data_is_retried_too() -> None:
    write = _failing(1, BusyLoadingError("loading"))
    assert retrying("ack", "j", write, keep_trying=lambda: True, sleep=lambda _: None) == "landed"


def test_the_last_broker_error_is_raised_once_no_longer_allowed() -> None:
    write = _failing(10, BrokerDown("down"))
    allowed = iter([True, True, False])
    with pytest.raises(BrokerDown):
        retrying("checkpoint", "j", write, keep_trying=lambda: next(allowed), sleep=lambda _: None)
    assert len(write.calls) == 3


def test_other_errors_are_not_retried() -> None:
    write = _failing(1, ResponseError("NOSCRIPT"))
    with pytest.raises(ResponseError):
        retrying("ack", "j", write, keep_trying=lambda: True, sleep=lambda _: None)
    assert len(write.calls) == 1


def test_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    # The shared backoff with the Celery settle's cap (0.5 s).
    delays = backoff(cap=RETRY_MAX, rng=lambda: 1.0)
    assert [round(next(delays), 2) for _ in range(6)] == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5]


def _decode(body: Any, encoding: Any) -> Any:
    return base64.b64decode(body, validate=True) if encoding == "base64" else body


GOOD = {
    "body": "W1tdLCB7fSwge31d",
    "properties": {
        "delivery_tag": "t",
        "body_encoding": "base64",
        "delivery_info": {"exchange": "", "routing_key": "celery"},
    },
}


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"\xff\xfe", "not UTF-8 text"),
        (b"words", "not JSON"),
        (b"42", "a JSON int"),
        (json.dumps({"body": "x"}).encode(), "no 'properties' object"),
        (json.dumps({**GOOD, "properties": {"delivery_tag": True}}).encode(), "delivery_tag"),
        (json.dumps({**GOOD, "properties": {"delivery_tag": "t"}}).encode(), "delivery_info"),
        (json.dumps({**GOOD, "body": "%%%"}).encode(), "the body does not decode"),
    ],
)
def test_entries_kombu_cannot_read_are_refused_with_the_reason(raw: bytes, says: str) -> None:
    reason = refusal(raw, _decode)
    assert reason is not None
    assert says in reason


def test_a_message_kombu_can_read_is_not_refused_whatever_its_task() -> None:
    # An unknown task or a body Celery cannot decode is Celery's to refuse (it logs, acks).
    assert refusal(json.dumps(GOOD).encode(), _decode) is None


def test_the_dead_letter_record_keeps_the_exact_bytes() -> None:
    raw = b"\xff" + b"x" * 300
    record = json.loads(dead_record("celery", raw, "not UTF-8 text", "w1"))
    assert base64.b64decode(record["entry"]) == raw
    assert record["text"].startswith("\\xffxxx")
    assert record["text"].endswith("...")
    assert (record["queue"], record["reason"], record["worker"]) == (
        "celery",
        "not UTF-8 text",
        "w1",
    )
    assert dead_key("celery") == "workerkit:celery:dead:celery"
