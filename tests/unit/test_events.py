"""The event protocol: typed events and commands, their one encoder and decoder, the client."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workerkit.events import (
    EVENT_TYPES,
    BadMessage,
    CheckpointSaved,
    Event,
    EventClient,
    FinishedJob,
    Heartbeat,
    Hello,
    Idempotency,
    JobFinished,
    JobHeartbeat,
    JobsFinished,
    JobStarted,
    QueueStats,
    Release,
    RequestStop,
    StoreHealth,
    WorkerReady,
    WorkerStopping,
    decode,
    decode_message,
    encode,
)

DELIVERY = {"job_id": "j1", "token": "tok", "queue": "default"}

#: One event of every type, and the keyword fields today's senders pass with its name.
EXAMPLES: list[tuple[Event, dict[str, Any]]] = [
    (Hello("worker", pid=42), {"role": "worker"}),
    (
        WorkerReady("sql", ("default", "batch"), 4),
        {"engine": "sql", "queues": ["default", "batch"], "concurrency": 4},
    ),
    (Heartbeat(running=2, ts=1.5), {"running": 2}),
    (StoreHealth(ok=False, reason="db: timeout"), {"ok": False, "reason": "db: timeout"}),
    (
        QueueStats(depth={"default": 3}, oldest_ready_age={"default": 1.5}),
        {"depth": {"default": 3}, "oldest_ready_age": {"default": 1.5}},
    ),
    (
        JobStarted("j1", "tasks.add", "default", 1, DELIVERY, None),
        {
            "job_id": "j1",
            "task": "tasks.add",
            "queue": "default",
            "attempt": 1,
            "delivery": DELIVERY,
            "queued_for": None,
        },
    ),
    (JobHeartbeat("j1"), {"job_id": "j1"}),
    (
        CheckpointSaved("j1", "tasks.add", "default"),
        {"job_id": "j1", "task": "tasks.add", "queue": "default"},
    ),
    (
        Idempotency("tasks.charge", "", "replayed"),
        {"task": "tasks.charge", "queue": "", "outcome": "replayed"},
    ),
    (
        JobFinished("j1", "tasks.add", "default", "succeeded", 0.25),
        {
            "job_id": "j1",
            "task": "tasks.add",
            "queue": "default",
            "outcome": "succeeded",
            "duration": 0.25,
        },
    ),
    (
        JobsFinished((FinishedJob("j1", "t", "q", "failed", 0.5),)),
        {"jobs": [["j1", "t", "q", "failed", 0.5]]},
    ),
    (WorkerStopping(running=0), {"running": 0}),
]


def test_every_event_type_has_a_class_and_an_example() -> None:
    assert {event.name for event, _ in EXAMPLES} == EVENT_TYPES


@pytest.mark.parametrize(("event", "fields"), EXAMPLES, ids=lambda x: getattr(x, "name", ""))
def test_a_typed_event_is_written_as_todays_senders_write_it(
    event: Event, fields: dict[str, Any]
) -> None:
    legacy = json.dumps(
        {"type": event.name, "pid": 42, "ts": 1.5, **fields}, separators=(",", ":")
    ).encode()
    assert encode(event, pid=42, ts=1.5) == legacy + b"\n"
    assert decode(legacy) == event


def test_commands_round_trip() -> None:
    assert encode(RequestStop()) == b'{"cmd":"request_stop"}\n'
    assert decode(encode(RequestStop())) == RequestStop()
    assert decode(encode(Release())) == Release()


def test_decoding_normalises_once() -> None:
    # Unknown outcomes are bounded, negative durations clamp to zero, counts become seconds.
    line = {"type": "job_finished", "job_id": "a", "outcome": "exploded", "duration": -2}
    assert decode_message(line) == JobFinished("a", outcome="unknown", duration=0.0)
    assert decode_message({"type": "heartbeat", "pid": 3, "extra": "ignored"}) == Heartbeat()


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ([1, 2], "not a JSON object"),
        ({"type": "bogus"}, "unknown event type 'bogus'"),
        ({"type": "job_started"}, "job_started: job_id is missing"),
        ({"type": "job_started", "job_id": 1}, "job_started: job_id has the wrong type"),
        (
            {"type": "job_finished", "job_id": "a", "duration": "x"},
            "job_finished: duration is not a number",
        ),
        (
            {"type": "worker_ready", "queues": ["a", 1]},
            "worker_ready: queues is not a list of strings",
        ),
    ],
)
def test_bad_messages_say_why(message: object, reason: str) -> None:
    assert decode_message(message) == BadMessage(reason)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(EVENT_TYPES)),
    st.dictionaries(
        st.sampled_from(["job_id", "task", "queue", "outcome", "duration", "jobs", "depth", "ok"]),
        json_values,
    ),
)
def test_decoding_never_raises(kind: str, fields: dict[str, Any]) -> None:
    result = decode_message({"type": kind, **fields})
    assert isinstance(result, BadMessage) or result.name == kind


# --- the client, on a real socket -------------------------------------------------------------


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, socket.socket]]:
    # A short path: sun_path is 108 bytes.
    path = os.path.join(tmp_path_factory.mktemp("s", numbered=True), "s.sock")
    if len(path) > 100:
        path = f"/tmp/wk-events-{os.getpid()}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    yield path, listener
    listener.close()
    Path(path).unlink(missing_ok=True)


def read_lines(conn: socket.socket, count: int) -> list[bytes]:
    data = b""
    conn.settimeout(5)
    while data.count(b"\n") < count:
        data += conn.recv(65536)
    return data.splitlines()


def test_the_client_sends_typed_and_named_events_alike(server: tuple[str, socket.socket]) -> None:
    path, listener = server
    client = EventClient(path, role="worker")
    conn, _ = listener.accept()
    try:
        client.send(JobStarted("j1", "tasks.add", "default", 1, DELIVERY, None))
        client.send(
            "job_started",
            job_id="j1",
            task="tasks.add",
            queue="default",
            attempt=1,
            delivery=DELIVERY,
            queued_for=None,
        )
        hello, typed, named = read_lines(conn, 3)
    finally:
        client.close()
        conn.close()
    assert decode(hello) == Hello("worker", pid=os.getpid())
    assert decode(typed) == decode(named)
    # The same bytes but for the time of sending.
    strip = [{k: v for k, v in json.loads(line).items() if k != "ts"} for line in (typed, named)]
    assert list(strip[0].items()) == list(strip[1].items())


def test_commands_reach_the_handlers(server: tuple[str, socket.socket]) -> None:
    path, listener = server
    client = EventClient(path, role="worker")
    conn, _ = listener.accept()
    got: list[tuple[str, dict[str, Any]]] = []
    arrived = threading.Event()

    def handler(command: str, message: dict[str, Any]) -> None:
        got.append((command, message))
        if len(got) == 2:
            arrived.set()

    client.on_command(handler)
    try:
        conn.sendall(b"junk\n" + encode(RequestStop()) + encode(Heartbeat()) + encode(Release()))
        assert arrived.wait(5)
    finally:
        client.close()
        conn.close()
    assert got == [("request_stop", {"cmd": "request_stop"}), ("release", {"cmd": "release"})]


def test_a_client_without_a_supervisor_drops_events_quietly() -> None:
    client = EventClient(None, role="worker")
    client.send(Heartbeat(running=1))
    client.send("heartbeat", running=1)
    assert not client.connected
