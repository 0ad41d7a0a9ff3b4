"""Presence.from_json: the stored record back, with every field's type checked.

A record of the wrong shape raises ValueError or TypeError (each store's ``list_all`` skips
it), never a Presence whose ``lost()`` or counts break the workers page later.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from workerkit.engines.presence import Presence

GOOD = Presence(
    worker_id="host:1:abc",
    hostname="host",
    pid=1,
    engine="sql",
    queues=("a", "b"),
    concurrency=4,
    state="draining",
    started_at=100.0,
    heartbeat_at=160.5,
    ttl=15.0,
    drain_deadline=170.0,
    jobs=("j1",),
    counts={"a": {"succeeded": 3, "failed": 1}},
)


def _with(**changes: Any) -> str:
    data = json.loads(GOOD.to_json())
    data.update(changes)
    return json.dumps(data)


def test_a_record_reads_back_as_written() -> None:
    back = Presence.from_json(GOOD.to_json())
    assert back == GOOD
    assert back.lost(200.0)
    assert not back.lost(170.0)
    assert Presence.from_json(_with(heartbeat_at=160, ttl=15)).heartbeat_at == 160.0  # ints


@pytest.mark.parametrize(
    "changes",
    [
        {"ttl": None},
        {"ttl": "15"},
        {"heartbeat_at": None},
        {"started_at": [1]},
        {"ttl": float("nan")},
        {"pid": "1"},
        {"pid": 1.5},
        {"concurrency": None},
        {"concurrency": True},
        {"queues": "ab"},
        {"queues": [1, 2]},
        {"jobs": None},
        {"counts": []},
        {"counts": {"a": 3}},
        {"counts": {"a": {"succeeded": "3"}}},
        {"counts": {"a": {"succeeded": None}}},
        {"state": "sleeping"},
        {"worker_id": 7},
        {"drain_deadline": "soon"},
        {"surprise": 1},
    ],
)
def test_a_record_of_the_wrong_shape_is_refused(changes: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        Presence.from_json(_with(**changes))


@pytest.mark.parametrize("text", ["[]", "1", "null", '"x"', "{}", "not json"])
def test_a_record_that_is_not_an_object_is_refused(text: str) -> None:
    with pytest.raises((ValueError, TypeError)):
        Presence.from_json(text)
