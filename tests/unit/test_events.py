"""The event protocol: typed events and commands, their encoder and decoder, the senders."""

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
    BatchingSender,
    CheckpointSaved,
    Event,
    EventClient,
    FinishedJob,
    Heartbeat,
    Hello,
    Idempotency,
    JobFinished,
    JobHeartbeat,
    JobPrefetched,
    JobsFinished,
    JobStarted,
    Outcome,
    PayloadRefused,
    Pending,
    PrefetchReturned,
    QueueStats,
    Release,
    RequestStop,
    ScheduleFired,
    SchedulerLeadership,
    StoreHealth,
    WorkerReady,
    WorkerStopping,
    decode,
    decode_message,
    encode,
    encode_batch,
)

DELIVERY = {"job_id": "j1", "token": "tok", "queue": "default"}

#: One event of every type, and the keyword fields today's senders pass with its name.
EXAMPLES: list[tuple[Event, dict[str, Any]]] = [
    (Hello("worker", pid=42), {"role": "worker"}),
    (
        WorkerReady("sql", ("default", "batch"), 4, "pod-1:7:0a1b2c3d"),
        {
            "engine": "sql",
            "queues": ["default", "batch"],
            "concurrency": 4,
            "worker_id": "pod-1:7:0a1b2c3d",
        },
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
    (
        JobPrefetched("j1", "default", DELIVERY),
        {"job_id": "j1", "queue": "default", "delivery": DELIVERY},
    ),
    (PrefetchReturned("j1"), {"job_id": "j1"}),
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
    (
        PayloadRefused("j1", "default", "pickled"),
        {"job_id": "j1", "queue": "default", "reason": "pickled"},
    ),
    (SchedulerLeadership(True, 7), {"leading": True, "epoch": 7}),
    (
        ScheduleFired("nightly", "fired", "on_time", 0.004),
        {"schedule": "nightly", "outcome": "fired", "reason": "on_time", "delay": 0.004},
    ),
]


def test_a_fire_outcome_no_sender_may_name_is_read_as_unknown() -> None:
    line = b'{"type":"schedule_fired","schedule":"s","outcome":"exploded","delay":-2}'
    assert decode(line) == ScheduleFired("s", "unknown", "", 0.0)


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


def test_the_client_writes_an_event_as_the_supervisor_reads_it(
    server: tuple[str, socket.socket],
) -> None:
    path, listener = server
    client = EventClient(path, role="worker")
    conn, _ = listener.accept()
    event = JobStarted("j1", "tasks.add", "default", 1, DELIVERY, None)
    try:
        client.send(event)
        hello, line = read_lines(conn, 2)
    finally:
        client.close()
        conn.close()
    assert decode(hello) == Hello("worker", pid=os.getpid())
    assert decode(line) == event
    # The envelope first, then the fields in the dataclass's order.
    assert list(json.loads(line)) == [
        "type",
        "pid",
        "ts",
        "job_id",
        "task",
        "queue",
        "attempt",
        "delivery",
        "queued_for",
    ]


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


def test_a_client_inherited_by_a_forked_child_writes_nothing(
    server: tuple[str, socket.socket],
) -> None:
    # A forked work horse holds its worker's client (an attribute of the worker object): what
    # it sent would reach the supervisor as the worker's own events, under the worker's pid.
    path, listener = server
    client = EventClient(path, role="worker")
    conn, _ = listener.accept()
    try:
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            try:
                client.send(WorkerStopping(0))
                with client.writer() as write:
                    if write is not None:
                        write(encode(WorkerStopping(1)))
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        client.send(Heartbeat(running=0))  # the parent's own, after the child's attempt
        hello, line = read_lines(conn, 2)
    finally:
        client.close()
        conn.close()
    assert decode(hello) == Hello("worker", pid=os.getpid())
    event = decode(line)
    assert isinstance(event, Heartbeat), event
    assert event.running == 0


def test_a_client_without_a_supervisor_drops_events_quietly() -> None:
    client = EventClient(None, role="worker")
    client.send(Heartbeat(running=1))
    assert not client.connected


# --- the batching sender: what one write to the supervisor carries ------------------------------


def started(job_id: str) -> Pending:
    return (JobStarted(job_id, "t", "q", 1), 1.0)


def finished(job_id: str, outcome: Outcome = "succeeded") -> Pending:
    return (JobFinished(job_id, "t", "q", outcome, 0.5), 2.0)


def batch_lines(batch: list[Pending]) -> list[dict[str, Any]]:
    data = encode_batch(7, batch)
    assert data.endswith(b"\n")
    # The wire format, and that the supervisor's decoder accepts every line of it.
    out = [json.loads(line) for line in data.splitlines()]
    assert not [line for line in data.splitlines() if isinstance(decode(line), BadMessage)]
    assert all(m["pid"] == 7 for m in out)
    return out


def test_jobs_that_started_and_succeeded_in_one_batch_are_one_jobs_finished_line() -> None:
    out = batch_lines([started("a"), finished("a"), started("b"), finished("b")])
    assert [m["type"] for m in out] == ["jobs_finished"]
    assert out[0]["jobs"] == [["a", "t", "q", "succeeded", 0.5], ["b", "t", "q", "succeeded", 0.5]]


def test_a_start_is_kept_when_its_job_is_still_running_or_did_not_succeed() -> None:
    out = batch_lines([started("a"), finished("a", "released"), started("b")])
    assert [m["type"] for m in out] == ["job_started", "jobs_finished", "job_started"]
    assert [out[0]["job_id"], out[2]["job_id"]] == ["a", "b"]
    assert out[0]["ts"] == 1.0  # an event keeps the time it was sent at


def test_only_consecutive_finishes_merge_so_the_order_of_a_job_is_kept() -> None:
    # Released, then redelivered and started again within one batch: the finish of the first
    # run must reach the supervisor before the start of the second.
    out = batch_lines([started("a"), finished("a", "released"), started("a"), finished("x")])
    assert [m["type"] for m in out] == [
        "job_started",
        "jobs_finished",
        "job_started",
        "jobs_finished",
    ]
    assert out[1]["jobs"] == [["a", "t", "q", "released", 0.5]]
    assert out[3]["jobs"] == [["x", "t", "q", "succeeded", 0.5]]


def test_other_events_keep_their_place_in_a_batch() -> None:
    saved: Pending = (CheckpointSaved("a", "t", "q"), 1.5)
    out = batch_lines([started("a"), saved, finished("a"), finished("b")])
    assert [m["type"] for m in out] == ["checkpoint_saved", "jobs_finished"]
    assert [job[0] for job in out[1]["jobs"]] == ["a", "b"]


def test_the_batching_sender_writes_what_gathered_as_the_supervisor_reads_it(
    server: tuple[str, socket.socket],
) -> None:
    path, listener = server
    client = EventClient(path, role="celery-executor")
    conn, _ = listener.accept()
    sender = BatchingSender(client)
    sender.send(started("a")[0])  # an idle worker's: written at once
    sender.send(finished("a")[0])
    sender.send(started("b")[0])
    sender.flush()
    client.close()
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    conn.close()
    assert not [line for line in data.splitlines() if isinstance(decode(line), BadMessage)]
    out = [json.loads(line) for line in data.splitlines()]
    # An idle worker's first event at once; then what gathered (or, on a slow machine, each
    # event alone): the same lines either way.
    assert [(m["type"], m.get("job_id")) for m in out] == [
        ("hello", None),
        ("job_started", "a"),
        ("jobs_finished", None),
        ("job_started", "b"),
    ]
    assert out[2]["jobs"] == [["a", "t", "q", "succeeded", 0.5]]
    assert all(m["pid"] == sender.pid for m in out)
